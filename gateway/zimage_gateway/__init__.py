"""OpenAI-compatible images API and browser playground in front of Triton servers of the ``zimage`` model.

``zimage-gateway`` (``zimage_gateway.cli``) serves ``POST /v1/images/generations``,
``GET /v1/models``, health, metrics and a playground at ``/``; it talks gRPC to one or
several Triton servers through ``zimage_client.AsyncZImageClient`` only.
"""

from .app import create_app
from .settings import GatewaySettings

__all__ = ["create_app", "GatewaySettings"]
