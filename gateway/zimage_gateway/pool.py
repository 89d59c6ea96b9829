"""The Triton servers behind the gateway: which one gets each image, and retrying on another.

Each image of a request is its own gRPC call, so ``n`` images spread over the servers (the one
with the fewest images in flight first, ties in turn). An UNAVAILABLE answer (queue full, out of
memory, not ready) or an unreachable server is retried after a backoff on a server not yet
tried, while one is left. Cancelling a call (the HTTP client left) cancels its gRPC call, which
stops the generation on the server at its next denoising step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from typing import Dict, List, Optional, Sequence

from zimage_client import AsyncZImageClient, GeneratedImage, ServerUnavailableError, ZImageConnectionError, ZImageError

from .metrics import GatewayMetrics
from .params import ImageRequest

__all__ = ["ServerPool"]

_LOGGER = logging.getLogger(__name__)
_RETRIED = (ServerUnavailableError, ZImageConnectionError)


@dataclasses.dataclass(eq=False)
class _Server:
    label: str  # what clients and metrics see: the servers' addresses stay in the log
    url: str
    client: AsyncZImageClient
    in_flight: int = 0


class ServerPool:
    def __init__(self, urls: Sequence[str], *, model_name: str, inference_timeout_s: float, retries: int,
                 retry_backoff_s: float, metrics: GatewayMetrics) -> None:
        self._servers = [
            _Server(f"server-{i}", url, AsyncZImageClient(url, protocol="grpc", model_name=model_name,
                                                         inference_timeout_s=inference_timeout_s))
            for i, url in enumerate(urls)
        ]
        self._turn = itertools.count()
        self._retries = retries
        self._backoff_s = retry_backoff_s
        self._metrics = metrics
        for server in self._servers:
            _LOGGER.info("%s is %s", server.label, server.url)

    def _pick(self, tried: List[_Server]) -> _Server:
        fresh = [s for s in self._servers if s not in tried] or self._servers
        turn = next(self._turn)
        order = {id(s): (i - turn) % len(self._servers) for i, s in enumerate(self._servers)}
        return min(fresh, key=lambda s: (s.in_flight, order[id(s)]))

    async def _one(self, request: ImageRequest, seed: Optional[int]) -> GeneratedImage:
        tried: List[_Server] = []
        while True:
            server = self._pick(tried)
            server.in_flight += 1
            self._metrics.in_flight.labels(server.label).inc()
            try:
                image = await server.client.generate(
                    request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                    width=request.width, num_inference_steps=request.num_inference_steps,
                    guidance_scale=request.guidance_scale, seed=seed, output_format=request.output_format,
                    image=request.image, mask=request.mask, strength=request.strength)
            except _RETRIED as exc:
                tried.append(server)
                if len(tried) > self._retries:
                    raise
                self._metrics.retries.labels(server.label).inc()
                _LOGGER.warning("%s (%s) failed, retrying elsewhere: %s", server.label, server.url, exc)
            else:
                self._metrics.images.labels(server.label).inc()
                return image
            finally:
                server.in_flight -= 1
                self._metrics.in_flight.labels(server.label).dec()
            await asyncio.sleep(self._backoff_s * 2 ** (len(tried) - 1))

    async def generate(self, request: ImageRequest) -> List[GeneratedImage]:
        """The request's n images in seed order; the first failure cancels the others and is raised."""
        tasks = [asyncio.ensure_future(self._one(request, seed)) for seed in request.seeds()]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def readiness(self, timeout_s: float) -> Dict[str, str]:
        """``{label: "ready" or why not}`` for every server, probed at once."""

        async def probe(server: _Server) -> str:
            try:
                await server.client.wait_for_ready(timeout_s)
            except ZImageError as exc:
                _LOGGER.info("%s (%s) is not ready: %s", server.label, server.url, exc)
                return "not ready"
            return "ready"

        answers = await asyncio.gather(*(probe(s) for s in self._servers))
        return {s.label: a for s, a in zip(self._servers, answers)}

    async def close(self) -> None:
        await asyncio.gather(*(s.client.close() for s in self._servers))
