"""Typed errors for the Z-Image client.

tritonclient reports every server-side failure as one ``InferenceServerException``
whose status is protocol-specific (``"StatusCode.INVALID_ARGUMENT"`` over gRPC,
``"400"`` over HTTP, sometimes ``None``) and reports transport failures as raw
``OSError``/``TimeoutError``.  Callers should not need to know which protocol
they used to decide whether to fix their request, retry later or give up, so
everything is normalised here into one small hierarchy::

    ZImageError
    ├── ZImageConnectionError        cannot reach the server at all
    ├── ZImageTimeoutError           client deadline / DEADLINE_EXCEEDED / wait_for_ready
    ├── ZImageResponseError          server answered but broke the output contract
    └── ZImageServerError            server rejected or failed the request (.code, .message)
        ├── InvalidRequestError      INVALID_ARG (fix the request; retrying will not help)
        ├── ServerUnavailableError   UNAVAILABLE (queue full, overloaded, model not ready: retry later)
        │   ├── QueueFullError       Triton's queue was full: refused at once, never queued
        │   ├── QueueTimeoutError    waited in Triton's queue past its queue timeout, never ran
        │   └── ResourceExhaustedError  RESOURCE_EXHAUSTED or out-of-memory
        └── RequestCancelledError    CANCELLED
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Dict, Optional

__all__ = [
    "ZImageError",
    "ZImageConnectionError",
    "ZImageTimeoutError",
    "ZImageResponseError",
    "ZImageServerError",
    "InvalidRequestError",
    "ServerUnavailableError",
    "QueueFullError",
    "QueueTimeoutError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "map_triton_error",
    "map_transport_error",
]


class ZImageError(Exception):
    """Base of every error this package raises on purpose.

    ``index`` is set by ``generate_many`` to the position of the failing prompt so a
    caller of a batch call can tell which prompt failed; it is ``None`` otherwise.
    ``results``/``errors`` are set by ``generate_many`` too, so work that succeeded
    is not lost when one prompt fails (see ``ZImageClient.generate_many``).
    """

    def __init__(self, message: str, *, index: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        self.results: Optional[list] = None
        self.errors: Optional[Dict[int, "ZImageError"]] = None

    def __str__(self) -> str:
        if self.index is None:
            return self.message
        return f"prompt #{self.index}: {self.message}"


class ZImageConnectionError(ZImageError):
    """The server could not be reached (refused, DNS, reset): nothing was processed."""


class ZImageTimeoutError(ZImageError):
    """A client-side deadline passed; the server may still be working on the request."""


class ZImageResponseError(ZImageError):
    """The server replied, but not with the outputs the contract promises."""


class ZImageServerError(ZImageError):
    """The server processed the request and reported an error.

    ``code`` is protocol-independent (``"INVALID_ARG"``, ``"UNAVAILABLE"``,
    ``"CANCELLED"``, ``"RESOURCE_EXHAUSTED"``, ``"INTERNAL"``, ``"NOT_FOUND"``,
    ``"UNSUPPORTED"``, ``"ALREADY_EXISTS"``, ``"UNKNOWN"``) so retry policies can be
    written once; ``message`` is the server's text verbatim because it is the only
    place that says *what* was wrong (e.g. which input); ``status`` is the raw
    tritonclient status for debugging.
    """

    def __init__(
        self,
        message: str,
        code: str = "UNKNOWN",
        *,
        status: Optional[str] = None,
        index: Optional[int] = None,
    ) -> None:
        super().__init__(message, index=index)
        self.code = code
        self.status = status


class InvalidRequestError(ZImageServerError):
    """The request itself is wrong; resending it unchanged will fail again."""


class ServerUnavailableError(ZImageServerError):
    """Transient server condition (queue full, overload, model loading); retry later."""


class QueueFullError(ServerUnavailableError):
    """Triton refused the request at once because the model's queue was full
    (config.pbtxt ``max_queue_size``). Nothing ran; the server is saturated, so retry
    after a back-off or on another replica."""


class QueueTimeoutError(ServerUnavailableError):
    """The request waited in Triton's queue longer than its queue timeout (config.pbtxt
    ``default_timeout_microseconds``) and was refused without running."""


class RequestCancelledError(ZImageServerError):
    """The request was cancelled before it completed."""


class ResourceExhaustedError(ServerUnavailableError):
    """The server ran out of a resource (typically GPU memory) for this request; it released
    it, so a smaller request, or the same one later, can succeed. Triton has no
    RESOURCE_EXHAUSTED code: the server sends UNAVAILABLE with a message that starts with the
    word, which is why this is also a ServerUnavailableError."""


_CLASS_FOR_CODE = {
    "INVALID_ARG": InvalidRequestError,
    # UNSUPPORTED also means "this request cannot be served as asked"; over HTTP
    # Triton sends it as 501 but INVALID_ARG as 400, and both need the caller to
    # change the request, so they share a class (the code keeps them apart).
    "UNSUPPORTED": InvalidRequestError,
    "UNAVAILABLE": ServerUnavailableError,
    "CANCELLED": RequestCancelledError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
}

# gRPC status names (str(grpc.StatusCode.X) == "StatusCode.X") -> our codes.
_GRPC_CODES = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "OUT_OF_RANGE": "INVALID_ARG",
    "FAILED_PRECONDITION": "INVALID_ARG",
    "UNAVAILABLE": "UNAVAILABLE",
    "CANCELLED": "CANCELLED",
    "RESOURCE_EXHAUSTED": "RESOURCE_EXHAUSTED",
    "INTERNAL": "INTERNAL",
    "DATA_LOSS": "INTERNAL",
    "NOT_FOUND": "NOT_FOUND",
    "UNIMPLEMENTED": "UNSUPPORTED",
    "ALREADY_EXISTS": "ALREADY_EXISTS",
    "UNKNOWN": "UNKNOWN",
    "DEADLINE_EXCEEDED": "DEADLINE_EXCEEDED",
    "UNAUTHENTICATED": "UNAUTHENTICATED",
    "PERMISSION_DENIED": "PERMISSION_DENIED",
    "ABORTED": "UNAVAILABLE",
}

# Triton's HTTP frontend maps INVALID_ARG, UNKNOWN, ALREADY_EXISTS and CANCELLED
# all to 400, so "400" is refined from the message below.
_HTTP_CODES = {
    "400": "INVALID_ARG",
    "401": "UNAUTHENTICATED",
    "403": "PERMISSION_DENIED",
    "404": "NOT_FOUND",
    "408": "DEADLINE_EXCEEDED",
    "409": "ALREADY_EXISTS",
    "413": "INVALID_ARG",
    "429": "RESOURCE_EXHAUSTED",
    "499": "CANCELLED",
    "500": "INTERNAL",
    "501": "UNSUPPORTED",
    "502": "UNAVAILABLE",
    "503": "UNAVAILABLE",
    "504": "DEADLINE_EXCEEDED",
}

_OOM_RE = re.compile(r"out of memory|outofmemory|\boom\b|cudaErrorMemoryAllocation|"
                     r"\bRESOURCE_EXHAUSTED\b", re.IGNORECASE)
_CANCEL_RE = re.compile(r"\bcancel+(ed|ation)\b", re.IGNORECASE)
# Triton's scheduler refuses with UNAVAILABLE for both; only the message tells them apart
# (over gRPC it is prefixed with "[request id: ...]").
_QUEUE_FULL_RE = re.compile(r"\bExceeds maximum queue size\b")
_QUEUE_TIMEOUT_RE = re.compile(r"\bRequest timeout expired\b")
_DEADLINE_RE = re.compile(r"deadline exceeded", re.IGNORECASE)
# gRPC reports "could not connect" as UNAVAILABLE, the same code Triton uses for
# "queue full"; only the message tells a dead server from a busy one.
_CONNECT_RE = re.compile(
    r"failed to connect|connection refused|connect failed|dns resolution failed|"
    r"name resolution|socket closed|connection reset|broken pipe|no route to host|"
    r"network is unreachable|transport closed|unable to connect",
    re.IGNORECASE,
)


def _code_from_status(status: Optional[str]) -> Optional[str]:
    if status is None:
        return None
    text = str(status).strip()
    if text.startswith("StatusCode."):
        return _GRPC_CODES.get(text[len("StatusCode.") :], "UNKNOWN")
    if text in _HTTP_CODES:
        return _HTTP_CODES[text]
    if text.isdigit():
        number = int(text)
        if 400 <= number < 500:
            return "INVALID_ARG"
        if 500 <= number < 600:
            return "INTERNAL"
    return "UNKNOWN"


def map_triton_error(exc: Any) -> ZImageError:
    """Turn a tritonclient ``InferenceServerException`` (gRPC or HTTP) into a ``ZImageError``.

    The status gives the coarse class; the message is consulted only where the
    status is ambiguous (HTTP 400, gRPC UNAVAILABLE, missing status) or where the
    server reports out-of-memory as a generic INTERNAL error.  The server's message
    is kept verbatim.  The returned exception is not raised: callers do
    ``raise map_triton_error(e) from e`` to keep the original as ``__cause__``.
    """
    message_fn = getattr(exc, "message", None)
    message = message_fn() if callable(message_fn) else None
    if message is None:
        message = str(exc)
    status_fn = getattr(exc, "status", None)
    status = status_fn() if callable(status_fn) else None
    status = None if status is None else str(status)

    code = _code_from_status(status)
    is_http_400 = status is not None and status.strip() == "400"

    if code is None:
        # No status: tritonclient raised it itself or the transport failed without a
        # code, so the message is all there is.
        if _DEADLINE_RE.search(message):
            code = "DEADLINE_EXCEEDED"
        elif _CONNECT_RE.search(message):
            return ZImageConnectionError(message)
        elif _CANCEL_RE.search(message):
            code = "CANCELLED"
        elif _OOM_RE.search(message):
            code = "RESOURCE_EXHAUSTED"
        else:
            code = "UNKNOWN"

    if code == "DEADLINE_EXCEEDED":
        return ZImageTimeoutError(message)
    if code == "UNAVAILABLE" and _CONNECT_RE.search(message):
        return ZImageConnectionError(message)
    if is_http_400 and _CANCEL_RE.search(message):
        code = "CANCELLED"
    if (code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE") or is_http_400) and _OOM_RE.search(message):
        code = "RESOURCE_EXHAUSTED"

    cls = _CLASS_FOR_CODE.get(code, ZImageServerError)
    if code == "UNAVAILABLE":
        if _QUEUE_FULL_RE.search(message):
            cls = QueueFullError
        elif _QUEUE_TIMEOUT_RE.search(message):
            cls = QueueTimeoutError
    return cls(message, code, status=status)


def map_transport_error(exc: BaseException, *, where: str, timeout_s: Optional[float] = None) -> Optional[ZImageError]:
    """Map a network-level exception from tritonclient's transports, or return None.

    HTTP clients surface socket problems as plain ``OSError``/``TimeoutError``
    (geventhttpclient) or ``asyncio.TimeoutError``/aiohttp errors rather than
    ``InferenceServerException``; ``where`` (e.g. ``"grpc://localhost:8001"``) is
    put in the message because the bare OS error does not say which server failed.
    None means "not a transport error", so the caller re-raises the original.
    """
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        after = f" after {timeout_s:.3g} s" if timeout_s is not None else ""
        return ZImageTimeoutError(f"request to {where} timed out{after}: {exc}".rstrip(": "))
    if isinstance(exc, OSError):
        return ZImageConnectionError(f"cannot reach {where}: {exc}")
    # aiohttp's disconnect errors (ServerDisconnectedError, ...) are not OSErrors;
    # match by module so this file does not import aiohttp.
    if type(exc).__module__.startswith("aiohttp"):
        return ZImageConnectionError(f"cannot reach {where}: {type(exc).__name__}: {exc}")
    return None
