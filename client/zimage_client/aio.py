"""asyncio client for the ``zimage`` Triton model (``tritonclient.grpc.aio`` / ``tritonclient.http.aio``)."""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ._calls import Calls
from ._fanout import ProgressHook, ProgressReporter, build_requests, check_concurrency, collect_results
from ._readiness import ReadinessWait, readiness_checks
from ._tensors import GenerateRequest, ImageArgument, parse_result
from ._transport import Transport
from .errors import ZImageError
from .generated_image import GeneratedImage
from ._tensors import parse_adapter_listing  # LoRA (issue 13)

__all__ = ["AsyncZImageClient"]

_LOGGER = logging.getLogger(__name__)


class AsyncZImageClient:
    """asyncio counterpart of ``ZImageClient``: same constructor, same methods as coroutines.

    Construction does no I/O and needs no running loop; the tritonclient aio
    client is created inside the first coroutine that needs it, because both aio
    transports (grpc.aio channels, aiohttp sessions) bind to the running loop.
    Use one instance per event loop.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        protocol: Optional[str] = None,
        model_name: str = "zimage",
        *,
        model_version: str = "",
        init_timeout_s: Optional[float] = None,
        inference_timeout_s: float = 120.0,
        connection_timeout_s: float = 10.0,
        verbose: bool = False,
    ) -> None:
        """Arguments are as for ``ZImageClient``.

        ``connection_timeout_s`` is accepted for symmetry; aiohttp enforces one
        total deadline per request (``inference_timeout_s``) that includes connecting.
        """
        self._transport = Transport(
            url, protocol, model_name, model_version, init_timeout_s, inference_timeout_s, connection_timeout_s
        )
        self._calls = Calls(self._transport)
        self._verbose = bool(verbose)
        self._triton: Any = None
        self._ready = self._transport.init_timeout_s is None
        self._ready_lock: Optional[asyncio.Lock] = None
        self._closed = False

    @property
    def url(self) -> str:
        return self._transport.endpoint.url

    @property
    def protocol(self) -> str:
        return self._transport.endpoint.protocol

    @property
    def model_name(self) -> str:
        return self._transport.model_name

    async def __aenter__(self) -> "AsyncZImageClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; idempotent.  Later calls raise ``RuntimeError``."""
        if self._closed:
            return
        self._closed = True
        client, self._triton = self._triton, None
        if client is not None:
            try:
                await client.close()
            except Exception as exc:  # best-effort cleanup must not mask the caller's error
                _LOGGER.debug("ignoring error while closing %r: %s", client, exc)

    def _lib(self) -> Any:
        return importlib.import_module(f"tritonclient.{self.protocol}.aio")

    def _client(self) -> Any:
        if self._closed:
            raise RuntimeError("AsyncZImageClient is closed")
        if self._triton is None:
            t = self._transport
            kwargs: Dict[str, Any] = {"verbose": self._verbose}
            if not t.is_grpc:
                kwargs["conn_timeout"] = t.inference_timeout_s
            with t.translate_errors("connect", None):
                self._triton = self._lib().InferenceServerClient(t.endpoint.address, **kwargs)
        return self._triton

    async def _probe(self, timeout_s: float) -> Optional[str]:
        t = self._transport
        client = self._client()
        with t.translate_errors("readiness check", timeout_s):
            for check in readiness_checks(t, self._calls, timeout_s):
                # wait_for bounds HTTP probes too, whose session deadline is the long inference one.
                if not await asyncio.wait_for(check.start(client), timeout_s):
                    return check.failure
        return None

    async def wait_for_ready(self, timeout_s: float) -> None:
        """Wait until the server is live and the model ready; ``ZImageTimeoutError`` after ``timeout_s``."""
        wait = ReadinessWait(self._transport, timeout_s)
        while True:
            probe_s = wait.next_probe_s()
            try:
                reason = await self._probe(probe_s)
            except ZImageError as exc:
                reason = str(exc)
            if reason is None:
                self._ready = True
                return
            await asyncio.sleep(wait.not_ready(reason))

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if not self._ready:
                assert self._transport.init_timeout_s is not None
                await self.wait_for_ready(self._transport.init_timeout_s)

    async def model_config(self) -> Dict[str, Any]:
        """The model's Triton config as a dict (same shape for gRPC and HTTP)."""
        t = self._transport
        with t.translate_errors("model config", t.inference_timeout_s):
            config = await self._client().get_model_config(t.model_name, t.model_version, **self._calls.metadata())
        return self._calls.model_config(config)

    async def server_metadata(self) -> Dict[str, Any]:
        """Triton's server metadata (name, version, extensions)."""
        t = self._transport
        with t.translate_errors("server metadata", t.inference_timeout_s):
            return await self._client().get_server_metadata(**self._calls.metadata())


    async def adapters(self) -> Dict[str, Any]:
        """The LoRA adapters this server's requests may name (no image is generated):
        ``{"adapters": {name: {"scale": default}}, "max_adapters_per_request": n,
        "max_adapter_scale": s, "format": ...}``; no adapters: an empty ``adapters``."""
        t = self._transport
        lib = self._lib()
        client = self._client()
        await self._ensure_ready()
        with t.translate_errors("adapter listing", t.inference_timeout_s):
            result = await client.infer(**self._calls.listing(lib))
        return parse_adapter_listing(result)

    async def _infer(self, request: GenerateRequest) -> GeneratedImage:
        t = self._transport
        client = self._client()
        call = self._calls.infer(request, self._lib())
        with t.translate_errors("inference", t.inference_timeout_s):
            result = await client.infer(**call)
        return parse_result(result, request)

    async def generate(
        self,
        prompt: str,
        *,
        negative_prompt: Optional[str] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: Optional[int] = None,
        output_format: Optional[str] = "png",
        loras: Optional[Mapping[str, Optional[float]]] = None,
        image: Optional[ImageArgument] = None,
        strength: Optional[float] = None,
        mask: Optional[ImageArgument] = None,
        control_image: Optional[ImageArgument] = None,
        control_scale: Optional[float] = None,
    ) -> GeneratedImage:
        """Generate one image; see ``ZImageClient.generate``."""
        request = GenerateRequest(
            prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            loras=loras,
            image=image,
            strength=strength,
            mask=mask,
            control_image=control_image,
            control_scale=control_scale,
        )
        self._client()
        await self._ensure_ready()
        return await self._infer(request)

    async def generate_many(
        self,
        prompts: Sequence[str],
        *,
        concurrency: int = 8,
        progress: Optional[ProgressHook] = None,
        negative_prompt: Optional[str] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: Union[int, Sequence[int], None] = None,
        output_format: Optional[str] = "png",
        loras: Optional[Mapping[str, Optional[float]]] = None,
        image: Optional[ImageArgument] = None,
        strength: Optional[float] = None,
        mask: Optional[ImageArgument] = None,
        control_image: Optional[ImageArgument] = None,
        control_scale: Optional[float] = None,
    ) -> List[GeneratedImage]:
        """One image per prompt in prompt order; same semantics as ``ZImageClient.generate_many``.

        At most ``concurrency`` requests are in flight (a semaphore around
        ``asyncio.gather``).  All requests run to completion; then the failure of the
        lowest index is raised with ``.index``, ``.results`` and ``.errors`` set.
        ``progress`` is called on the event loop as each prompt finishes.
        Cancelling the call cancels the requests still in flight.
        """
        concurrency = check_concurrency(concurrency)
        requests = build_requests(
            prompts,
            seed,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_format=output_format,
            loras=loras,
            image=image,
            strength=strength,
            mask=mask,
            control_image=control_image,
            control_scale=control_scale,
        )
        self._client()
        if not requests:
            return []
        await self._ensure_ready()

        outcomes: List[Any] = [None] * len(requests)
        report = ProgressReporter(progress)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(index: int, request: GenerateRequest) -> None:
            async with semaphore:
                try:
                    outcomes[index] = await self._infer(request)
                except Exception as exc:  # recorded; raised by collect_results after the batch
                    outcomes[index] = exc
            report(index, outcomes[index])

        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        if report.error is not None:
            raise report.error
        return collect_results(outcomes)
