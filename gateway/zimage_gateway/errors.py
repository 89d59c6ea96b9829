"""Errors in OpenAI's shape, and which HTTP status each of our client's errors becomes.

The official SDKs pick their exception class from the status alone (400 BadRequestError, 401
AuthenticationError, 429 RateLimitError, 5xx InternalServerError) and read ``error.message``,
``error.type``, ``error.param`` and ``error.code`` from the body, so both have to match.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

from zimage_client import (
    InvalidRequestError,
    RequestCancelledError,
    ServerUnavailableError,
    ZImageConnectionError,
    ZImageError,
    ZImageResponseError,
    ZImageTimeoutError,
)

__all__ = ["ApiError", "invalid", "from_client_error"]

# The SDKs retry 408, 409, 429 and 5xx unless the answer says otherwise; an answer that will not
# change on a retry says so.
NO_RETRY = {"x-should-retry": "false"}
_FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 501})

# The server names its tensors; the API caller wrote these fields.
_PARAM_OF_INPUT = {
    "PROMPT": "prompt",
    "NEGATIVE_PROMPT": "negative_prompt",
    "HEIGHT": "size",
    "WIDTH": "size",
    "NUM_INFERENCE_STEPS": "num_inference_steps",
    "GUIDANCE_SCALE": "guidance_scale",
    "SEED": "seed",
    "OUTPUT_FORMAT": "output_format",
    "IMAGE_INPUT": "image",
    "MASK": "mask",
    "STRENGTH": "strength",
}
_INPUT_NAMED = re.compile(r"^([A-Z_]+):|'([A-Z_]+)'")


class ApiError(Exception):
    """One error answer: the HTTP status and OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = {**(NO_RETRY if status in _FINAL_STATUSES else {}), **(headers or {})}

    def body(self) -> Dict[str, Dict[str, Optional[str]]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    """A 400 for one field of the request; ``message`` says the value and what is allowed."""
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _param_of(message: str) -> Optional[str]:
    match = _INPUT_NAMED.search(message)
    if match is None:
        return None
    return _PARAM_OF_INPUT.get(match.group(1) or match.group(2))


def from_client_error(exc: ZImageError) -> ApiError:
    """The answer for a generation that failed after retries.

    Server messages are passed on: they name the field and the limit, and an INTERNAL one names
    the exception type only. Connection errors are not: they would show clients the servers'
    internal addresses, which stay in the gateway's log.
    """
    if isinstance(exc, InvalidRequestError):
        param = _param_of(exc.message)
        message = f"{param}: {exc.message}" if param else exc.message
        return ApiError(400, message, param=param, code="invalid_value")
    if isinstance(exc, ServerUnavailableError):
        code = "resource_exhausted" if "RESOURCE_EXHAUSTED" in exc.message else "server_busy"
        return ApiError(503, f"the image servers are busy: {exc.message}", type="server_error", code=code,
                        headers={"retry-after": "1"})
    if isinstance(exc, ZImageConnectionError):
        return ApiError(503, "no image server could be reached", type="server_error",
                        code="server_unreachable", headers={"retry-after": "1"})
    if isinstance(exc, RequestCancelledError):
        return ApiError(503, f"the image server cancelled the request: {exc.message}", type="server_error",
                        code="cancelled")
    if isinstance(exc, ZImageTimeoutError):
        return ApiError(504, "the image server did not answer in time", type="server_error", code="timeout")
    if isinstance(exc, ZImageResponseError):
        return ApiError(502, "the image server sent a malformed answer", type="server_error", code="bad_gateway")
    return ApiError(500, f"the image server failed: {exc.message}", type="server_error", code="server_error")
