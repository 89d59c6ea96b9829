"""The gateway's settings: command-line flags, each with an environment variable as its default."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .auth import load_keys

__all__ = ["GatewaySettings", "parse_args", "ENV_PREFIX", "KEYS_ENV"]

ENV_PREFIX = "ZIMAGE_GATEWAY_"
# Keys are never a flag: a command line is visible to every user of the host in ps.
KEYS_ENV = ENV_PREFIX + "API_KEYS"


@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs to run; ``parse_args`` documents each field."""

    servers: Tuple[str, ...]
    api_keys: Tuple[str, ...] = ()
    allow_anonymous: bool = False
    model_id: str = "Tongyi-MAI/Z-Image-Turbo"
    triton_model: str = "zimage"
    max_n: int = 4
    max_body_bytes: int = 65536
    # An edit's multipart body: a 2048x2048 photo is a PNG of about 12 MiB.
    max_image_bytes: int = 20 * 2**20
    max_concurrent_per_key: int = 4
    max_waiting_per_key: int = 8
    max_wait_s: float = 30.0
    retries: int = 2
    retry_backoff_s: float = 0.2
    inference_timeout_s: float = 300.0
    ready_timeout_s: float = 2.0
    # uvicorn's default of 5 s closes an SDK's pooled connection between two images.
    keep_alive_s: int = 75
    cors_origins: Tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("at least one Triton gRPC server is needed (--server)")
        if not self.api_keys and not self.allow_anonymous:
            raise ValueError(f"no API keys: give --api-key-file or ${KEYS_ENV}, or --allow-anonymous "
                             f"for a gateway that only trusted clients can reach")
        for name in ("max_n", "max_body_bytes", "max_image_bytes", "max_concurrent_per_key", "keep_alive_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_waiting_per_key", "retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("max_wait_s", "retry_backoff_s", "inference_timeout_s", "ready_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def _list(value: Optional[str]) -> Tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _parser() -> argparse.ArgumentParser:
    d = GatewaySettings.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="zimage-gateway",
        description="OpenAI-compatible images API and playground in front of Triton servers of zimage. "
                    f"Every flag defaults to ${ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}MAX_N).")

    def add(flag: str, kind=str, help: str = "", field: Optional[str] = None) -> None:
        field = field or flag.replace("-", "_")
        default = d[field].default if field in d else None
        env = _env(flag)
        p.add_argument(f"--{flag}", type=kind, default=kind(env) if env is not None else default,
                       help=f"{help} (default: {default})")

    p.add_argument("--server", action="append", default=None, metavar="URL",
                   help=f"a Triton gRPC URL, e.g. grpc://host:8001; repeat for several "
                        f"(default: ${ENV_PREFIX}SERVERS, comma-separated)")
    p.add_argument("--api-key-file", type=Path, default=_env("api-key-file"),
                   help=f"API keys, one a line; ${KEYS_ENV} (comma-separated) adds more")
    p.add_argument("--allow-anonymous", action="store_true",
                   default=_env("allow-anonymous", "") not in ("", "0", "false"),
                   help="serve without API keys (only behind something that authenticates)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help=f"allow browser pages of this origin; repeat for several (default: none; "
                        f"${ENV_PREFIX}CORS_ORIGINS, comma-separated)")
    add("model-id", help="the model name /v1/models lists and requests may give")
    add("triton-model", help="the model's name on the Triton servers")
    add("max-n", int, "most images one request may ask for")
    add("max-body-bytes", int, "largest request body")
    add("max-image-bytes", int, "largest body of /v1/images/edits (its image and mask files included)")
    add("max-concurrent-per-key", int, "requests of one API key generating at once")
    add("max-waiting-per-key", int, "requests of one API key waiting for a slot; more get 429")
    add("max-wait-s", float, "longest wait for a slot before 429")
    add("retries", int, "retries of an UNAVAILABLE or unreachable server, each on another server")
    add("retry-backoff-s", float, "wait before the first retry, doubled each time")
    add("inference-timeout-s", float, "gRPC deadline per image (the server stops at it)")
    add("ready-timeout-s", float, "how long /health/ready waits for each server")
    add("keep-alive-s", int, "how long an idle HTTP connection stays open")
    add("host", help="address to listen on")
    add("port", int, "port to listen on")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> GatewaySettings:
    args = _parser().parse_args(argv)
    servers = tuple(args.server) if args.server else _list(_env("servers"))
    origins = tuple(args.cors_origin) if args.cors_origin else _list(_env("cors-origins"))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GatewaySettings) if hasattr(args, f.name)}
    values.update(servers=servers, cors_origins=origins, api_keys=load_keys(args.api_key_file, KEYS_ENV))
    return GatewaySettings(**values)
