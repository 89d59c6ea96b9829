"""Parse the user's ``url``/``protocol`` pair into what tritonclient expects.

tritonclient wants a bare ``host:port`` and a separate choice of module, while
users naturally write ``grpc://host:8001`` or just ``localhost``; resolving that
once here keeps the sync and asyncio clients consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

__all__ = ["Endpoint", "parse_endpoint", "DEFAULT_PORTS", "PROTOCOLS"]

PROTOCOLS = ("grpc", "http")
# Triton's stock ports, so "localhost" alone works for either protocol.
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
DEFAULT_PROTOCOL = "grpc"


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` as tritonclient's constructors want it (IPv6 bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.address}"


def parse_endpoint(url: Optional[str] = None, protocol: Optional[str] = None) -> Endpoint:
    """Resolve ``url`` and ``protocol`` to an ``Endpoint``.

    A scheme in ``url`` decides the protocol; an explicit ``protocol`` that
    contradicts it is an error rather than silently picking one, because the
    wrong protocol against Triton's other port fails in confusing ways.  Without
    either, gRPC is used.  A missing port defaults to Triton's port for the
    protocol (8000 HTTP, 8001 gRPC).
    """
    if protocol is not None:
        protocol = protocol.strip().lower()
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")

    text = "localhost" if url is None else url.strip()
    if not text:
        raise ValueError("url must not be empty")

    scheme = None
    if "://" in text:
        scheme, _, rest = text.partition("://")
        scheme = scheme.lower()
        if scheme not in PROTOCOLS:
            raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}; use one of {PROTOCOLS} or none")
        if protocol is not None and protocol != scheme:
            raise ValueError(f"url {url!r} says {scheme!r} but protocol={protocol!r}")
        protocol = scheme
    else:
        rest = text
    protocol = protocol or DEFAULT_PROTOCOL

    parts = urlsplit("//" + rest)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"url {url!r} must be host[:port] without a path")
    if parts.username or parts.password:
        raise ValueError(f"url {url!r} must not contain credentials")
    host = parts.hostname
    if not host:
        raise ValueError(f"url {url!r} has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"url {url!r} has an invalid port") from exc
    if port is None:
        port = DEFAULT_PORTS[protocol]
    return Endpoint(protocol=protocol, host=host, port=port)
