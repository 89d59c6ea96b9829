"""Synchronous client for the ``zimage`` Triton model."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ._calls import Calls
from ._fanout import ProgressHook, ProgressReporter, build_requests, check_concurrency, collect_results
from ._readiness import ReadinessWait, readiness_checks
from ._tensors import GenerateRequest, ImageArgument, parse_result
from ._transport import Transport
from .errors import ZImageError
from .generated_image import GeneratedImage
from ._tensors import parse_adapter_listing  # LoRA (issue 13)

__all__ = ["ZImageClient"]

_LOGGER = logging.getLogger(__name__)

class ZImageClient:
    """Blocking client for Z-Image-Turbo served by Triton (model ``zimage``).

    Construction does no network I/O: the tritonclient connection is created on
    first use, so a client can be built before the server is up and errors show
    up where the request is made.  With ``init_timeout_s`` set, the first request
    first waits (once) up to that long for the server and model to become ready;
    without it, a server that is down fails the first call fast with
    ``ZImageConnectionError``.

    The client is safe to share between threads: gRPC uses one channel, which is
    thread-safe; tritonclient's HTTP client is gevent-based and hangs when shared
    across OS threads, so HTTP gets one connection per thread.
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
        """
        Args:
            url: ``host[:port]``, ``grpc://host[:port]`` or ``http://host[:port]``;
                default ``localhost`` on Triton's port for the protocol (8001 gRPC, 8000 HTTP).
            protocol: ``"grpc"`` or ``"http"``; inferred from the URL scheme when omitted,
                gRPC when neither says.
            model_name: Triton model to call.
            model_version: Triton model version; ``""`` means the server's version policy (latest).
            init_timeout_s: if set, the first request waits up to this long for readiness.
            inference_timeout_s: client-side deadline per request, including queueing.
            connection_timeout_s: TCP connect deadline (HTTP only; gRPC fails fast on refusal
                and is otherwise bounded by ``inference_timeout_s``).
            verbose: passed to tritonclient, which then prints every request.
        """
        self._transport = Transport(
            url, protocol, model_name, model_version, init_timeout_s, inference_timeout_s, connection_timeout_s
        )
        self._calls = Calls(self._transport)
        self._verbose = bool(verbose)
        self._lock = threading.Lock()
        self._ready_lock = threading.Lock()
        self._ready = self._transport.init_timeout_s is None
        self._closed = False
        self._grpc_client: Any = None
        self._http_local = threading.local()
        self._http_clients: List[Any] = []

    # -- properties -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """Normalised ``protocol://host:port``."""
        return self._transport.endpoint.url

    @property
    def protocol(self) -> str:
        return self._transport.endpoint.protocol

    @property
    def model_name(self) -> str:
        return self._transport.model_name

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> "ZImageClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close all connections; idempotent.  Later calls raise ``RuntimeError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = [self._grpc_client, *self._http_clients]
            self._grpc_client = None
            self._http_clients = []
        for client in clients:
            if client is not None:
                _close_quietly(client)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ZImageClient is closed")

    # -- tritonclient plumbing ------------------------------------------------------

    def _lib(self) -> Any:
        return importlib.import_module(f"tritonclient.{self.protocol}")

    def _new_http_client(
        self, *, connection_timeout_s: Optional[float] = None, network_timeout_s: Optional[float] = None
    ) -> Any:
        t = self._transport
        with t.translate_errors("connect", t.connection_timeout_s):
            return self._lib().InferenceServerClient(
                t.endpoint.address,
                verbose=self._verbose,
                connection_timeout=connection_timeout_s or t.connection_timeout_s,
                network_timeout=network_timeout_s or t.inference_timeout_s,
            )

    def _client(self) -> Any:
        """The tritonclient client for the calling thread, created on first use."""
        self._check_open()
        if self._transport.is_grpc:
            with self._lock:
                self._check_open()
                if self._grpc_client is None:
                    with self._transport.translate_errors("connect", None):
                        self._grpc_client = self._lib().InferenceServerClient(
                            self._transport.endpoint.address, verbose=self._verbose
                        )
                return self._grpc_client
        client = getattr(self._http_local, "client", None)
        if client is None:
            client = self._new_http_client()
            with self._lock:
                if self._closed:
                    _close_quietly(client)
                    self._check_open()
                self._http_clients.append(client)
            self._http_local.client = client
        return client

    # -- readiness --------------------------------------------------------------------

    def _probe(self, timeout_s: float) -> Optional[str]:
        """One readiness check; returns None when ready, else why not."""
        t = self._transport
        if t.is_grpc:
            client, owned = self._client(), False
        else:
            # A fresh client per probe, so the probe honours the remaining wait time
            # rather than the (much longer) inference timeout.
            client, owned = self._new_http_client(connection_timeout_s=timeout_s, network_timeout_s=timeout_s), True
        try:
            with t.translate_errors("readiness check", timeout_s):
                for check in readiness_checks(t, self._calls, timeout_s):
                    if not check.start(client):
                        return check.failure
            return None
        finally:
            if owned:
                _close_quietly(client)

    def wait_for_ready(self, timeout_s: float) -> None:
        """Block until the server is live and the model is ready.

        Raises ``ZImageTimeoutError`` (with the last reason seen) when ``timeout_s``
        passes; connection failures are retried, since a server that is starting
        refuses connections for a while.
        """
        wait = ReadinessWait(self._transport, timeout_s)
        while True:
            probe_s = wait.next_probe_s()
            try:
                reason = self._probe(probe_s)
            except ZImageError as exc:
                reason = str(exc)
            if reason is None:
                self._ready = True
                return
            time.sleep(wait.not_ready(reason))

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        with self._ready_lock:
            if not self._ready:
                assert self._transport.init_timeout_s is not None
                self.wait_for_ready(self._transport.init_timeout_s)

    # -- metadata ---------------------------------------------------------------------

    def model_config(self) -> Dict[str, Any]:
        """The model's Triton config as a dict (same shape for gRPC and HTTP)."""
        t = self._transport
        with t.translate_errors("model config", t.inference_timeout_s):
            config = self._client().get_model_config(t.model_name, t.model_version, **self._calls.metadata())
        return self._calls.model_config(config)

    def server_metadata(self) -> Dict[str, Any]:
        """Triton's server metadata (name, version, extensions)."""
        t = self._transport
        with t.translate_errors("server metadata", t.inference_timeout_s):
            client = self._client()
            return client.get_server_metadata(**self._calls.metadata())


    def adapters(self) -> Dict[str, Any]:
        """The LoRA adapters this server's requests may name (no image is generated):
        ``{"adapters": {name: {"scale": default}}, "max_adapters_per_request": n,
        "max_adapter_scale": s, "format": ...}``; no adapters: an empty ``adapters``."""
        t = self._transport
        lib = self._lib()
        self._check_open()
        self._ensure_ready()
        with t.translate_errors("adapter listing", t.inference_timeout_s):
            result = self._client().infer(**self._calls.listing(lib))
        return parse_adapter_listing(result)

    # -- inference --------------------------------------------------------------------

    def _infer(self, client: Any, request: GenerateRequest) -> GeneratedImage:
        t = self._transport
        call = self._calls.infer(request, self._lib())
        started = time.perf_counter()
        with t.translate_errors("inference", t.inference_timeout_s):
            result = client.infer(**call)
        image = parse_result(result, request)
        _LOGGER.debug(
            "generated %dx%d %s seed=%d in %.1f ms", image.width, image.height, image.format, image.seed,
            (time.perf_counter() - started) * 1000.0,
        )
        return image

    def generate(
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
        """Generate one image.

        Arguments left as None are not sent, so the server's defaults apply
        (including a random seed; the seed used is in the result).  Server-side
        validation errors raise ``InvalidRequestError`` with the server's message.

        Image inputs (each a path, read here, bytes of a PNG, JPEG or WebP file, or a PIL
        image, sent as PNG): ``image`` with ``strength`` is image-to-image; ``mask`` (white
        where to repaint) with ``image`` is inpainting; ``control_image`` with
        ``control_scale`` is ControlNet guidance (the server needs a configured ControlNet).
        ``strength`` and ``control_scale`` left None take the server's defaults. A part
        given without the one it needs (``mask`` without ``image``, ...) raises
        ``ValueError``, an argument of the wrong type ``TypeError``, before anything is sent.
        """
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
        self._check_open()
        self._ensure_ready()
        return self._infer(self._client(), request)

    def generate_many(
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
        """Generate one image per prompt, returned in prompt order.

        Each prompt is its own request and up to ``concurrency`` are in flight at
        once, so every model instance always has a request waiting.  ``seed`` is
        either a base (prompt ``i`` uses ``seed + i``) or one seed per prompt. Image
        arguments are as for ``generate`` and apply to every prompt (read once).

        ``progress`` is called as ``progress(index, image_or_exception)`` when each
        prompt finishes (in completion order, one call at a time, from worker
        threads), or, if it is a tqdm-like object, ``progress.update(1)``.

        Failures do not cancel the other prompts: every request runs to completion,
        then the error of the lowest failing index is raised.  Its message starts
        with ``prompt #<index>:``; it also carries ``.index``, ``.results`` (prompt
        order, ``None`` where failed) and ``.errors`` (``{index: exception}``) so
        successful images are still available.
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
        self._check_open()
        if not requests:
            return []
        self._ensure_ready()

        outcomes: List[Any] = [None] * len(requests)
        report = ProgressReporter(progress)
        next_index = iter(range(len(requests)))
        index_lock = threading.Lock()
        stop = threading.Event()

        def worker() -> None:
            # HTTP clients must not cross threads, so each worker owns one and closes it
            # itself; gRPC workers share the client's thread-safe channel.
            owned = None
            try:
                client = self._client() if self._transport.is_grpc else None
                while not stop.is_set():
                    with index_lock:
                        index = next(next_index, None)
                    if index is None:
                        return
                    try:
                        if client is None:
                            owned = client = self._new_http_client()
                        outcomes[index] = self._infer(client, requests[index])
                    except Exception as exc:  # recorded; raised by collect_results after the batch
                        outcomes[index] = exc
                    report(index, outcomes[index])
            except Exception as exc:  # e.g. client closed mid-batch: fail the rest, don't hang
                _fail_remaining(outcomes, exc)
            finally:
                if owned is not None:
                    _close_quietly(owned)

        threads = [
            threading.Thread(target=worker, name=f"zimage-generate-{i}", daemon=True)
            for i in range(min(concurrency, len(requests)))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                # join() with a timeout keeps the main thread responsive to Ctrl-C.
                while thread.is_alive():
                    thread.join(0.2)
        except BaseException:
            stop.set()
            raise
        if report.error is not None:
            raise report.error
        return collect_results(outcomes)


def _fail_remaining(outcomes: List[Any], exc: BaseException) -> None:
    for i, outcome in enumerate(outcomes):
        if outcome is None:
            outcomes[i] = exc


def _close_quietly(client: Any) -> None:
    # Closing is best-effort cleanup; a failure here must not mask the caller's error.
    try:
        client.close()
    except Exception as exc:
        _LOGGER.debug("ignoring error while closing %r: %s", client, exc)
