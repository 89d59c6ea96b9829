"""The gateway's Prometheus metrics, in a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics"]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zimage_gateway_requests_total", "Answered API requests", ["route", "status"],
                                registry=r)
        self.duration = Histogram("zimage_gateway_request_duration_seconds", "API request time, admission included",
                                  ["route"], registry=r,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.images = Counter("zimage_gateway_images_total", "Images generated, by server", ["server"], registry=r)
        self.retries = Counter("zimage_gateway_upstream_retries_total",
                               "Attempts that failed UNAVAILABLE or unreachable and were retried, by server",
                               ["server"], registry=r)
        self.disconnects = Counter("zimage_gateway_client_disconnects_total",
                                   "Requests whose client left before the answer; their gRPC calls were cancelled",
                                   registry=r)
        self.rejected = Counter("zimage_gateway_rejected_total", "Requests refused before generation", ["reason"],
                                registry=r)
        self.in_flight = Gauge("zimage_gateway_images_in_flight", "Images being generated, by server", ["server"],
                               registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
