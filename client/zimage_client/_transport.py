"""Connection settings and error translation shared by the sync and asyncio clients.

Kept apart from both client classes so URL parsing, timeout validation and the
mapping of tritonclient/socket errors cannot drift between them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from ._endpoint import Endpoint, parse_endpoint
from .errors import (
    ZImageConnectionError,
    ZImageError,
    ZImageTimeoutError,
    map_transport_error,
    map_triton_error,
)

__all__ = ["Transport"]


def _check_timeout(name: str, value: Optional[float], *, allow_none: bool) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a positive number")
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class Transport:
    """Where the server is, how long to wait for it, and how its errors are reported."""

    def __init__(
        self,
        url: Optional[str],
        protocol: Optional[str],
        model_name: str,
        model_version: str,
        init_timeout_s: Optional[float],
        inference_timeout_s: float,
        connection_timeout_s: float,
    ) -> None:
        self.endpoint: Endpoint = parse_endpoint(url, protocol)
        if not isinstance(model_name, str) or not model_name:
            raise ValueError("model_name must be a non-empty str")
        self.model_name = model_name
        self.model_version = str(model_version or "")
        self.init_timeout_s = _check_timeout("init_timeout_s", init_timeout_s, allow_none=True)
        self.inference_timeout_s = _check_timeout("inference_timeout_s", inference_timeout_s, allow_none=False)
        self.connection_timeout_s = _check_timeout("connection_timeout_s", connection_timeout_s, allow_none=False)

    @property
    def is_grpc(self) -> bool:
        return self.endpoint.protocol == "grpc"

    @contextlib.contextmanager
    def translate_errors(self, action: str, timeout_s: Optional[float]) -> Iterator[None]:
        """Re-raise tritonclient and socket errors as ``ZImageError``s that name the server and deadline."""
        from tritonclient.utils import InferenceServerException

        try:
            yield
        except InferenceServerException as exc:
            mapped = map_triton_error(exc)
            if isinstance(mapped, ZImageTimeoutError):
                mapped = ZImageTimeoutError(
                    f"{action} on {self.endpoint.url} timed out after {timeout_s:.3g} s ({exc.message()})"
                    if timeout_s is not None
                    else f"{action} on {self.endpoint.url} timed out ({exc.message()})"
                )
            elif isinstance(mapped, ZImageConnectionError):
                mapped = ZImageConnectionError(f"cannot reach {self.endpoint.url}: {mapped.message}")
            raise mapped from exc
        except ZImageError:
            raise
        except Exception as exc:
            mapped = map_transport_error(exc, where=self.endpoint.url, timeout_s=timeout_s)
            if mapped is None:
                raise
            raise mapped from exc
