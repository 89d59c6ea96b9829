"""Client for Z-Image-Turbo served by NVIDIA Triton Inference Server (model ``zimage``).

A thin layer over ``tritonclient`` so callers deal in prompts and images rather
than tensors, and get typed errors that read the same over gRPC and HTTP::

    from zimage_client import ZImageClient

    with ZImageClient("grpc://localhost:8001") as client:
        client.wait_for_ready(60)
        result = client.generate("a red fox in the snow", seed=42)
        result.save("fox.png")

``AsyncZImageClient`` (``zimage_client.aio``) offers the same API for asyncio.
"""

from .aio import AsyncZImageClient
from .client import ZImageClient
from .errors import (
    InvalidRequestError,
    QueueFullError,
    QueueTimeoutError,
    RequestCancelledError,
    ResourceExhaustedError,
    ServerUnavailableError,
    ZImageConnectionError,
    ZImageError,
    ZImageResponseError,
    ZImageServerError,
    ZImageTimeoutError,
    map_triton_error,
)
from .generated_image import GeneratedImage

__all__ = [
    "ZImageClient",
    "AsyncZImageClient",
    "GeneratedImage",
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
]
