"""The gateway's added latency per image: the same request through zimage-gateway (HTTP, JSON,
base64) and straight to the Triton server over gRPC, same server, interleaved, medians and ratio.

  python -m bench.gateway --gateway-url http://127.0.0.1:8080 --grpc-url grpc://127.0.0.1:8001 \\
      --size 1024 --steps 8 --repeats 20 --out bench/results/<folder>/gateway_1024.json

The API key is read from $ZIMAGE_GATEWAY_KEY (never a flag: command lines are visible in ps).
Both sides are timed until the client holds the encoded image bytes: for the gateway that
includes reading the JSON and decoding the base64. Each pair uses one seed and alternates which
side goes first, so drift and caching favour neither; both must return the same image.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import PROMPT, stamp, summarize, write_json
from zimage_client import ZImageClient

KEY_ENV = "ZIMAGE_GATEWAY_KEY"


class GatewaySide:
    """One keep-alive HTTP connection to the gateway, as an application's client would hold."""

    def __init__(self, url: str, key: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.connection = kind(parts.hostname, parts.port, timeout=timeout_s)
        self.path = parts.path.rstrip("/") + "/v1/images/generations"
        self.headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    def generate(self, size: int, steps: int, seed: int) -> bytes:
        body = json.dumps({"prompt": PROMPT, "size": f"{size}x{size}", "num_inference_steps": steps,
                           "seed": seed, "response_format": "b64_json"})
        try:
            self.connection.request("POST", self.path, body, self.headers)
            response = self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The gateway closed the idle connection (--keep-alive-s): one reconnect, timed too.
            self.connection.close()
            self.connection.request("POST", self.path, body, self.headers)
            response = self.connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"gateway answered {response.status}: {answer[:500]!r}")
        self.upstream_s = float(re.search(r"upstream;dur=([0-9.]+)", response.headers["server-timing"]).group(1)) / 1000
        return base64.b64decode(json.loads(answer)["data"][0]["b64_json"])


def _p90(values: list[float]) -> float:
    return round(summarize([v / 1000 for v in values])["p90_s"] * 1000, 2)


def run(args: argparse.Namespace, key: str) -> dict:
    gateway = GatewaySide(args.gateway_url, key, args.timeout_s)
    with ZImageClient(args.grpc_url, protocol="grpc", inference_timeout_s=args.timeout_s) as direct:
        def timed(side: str, seed: int) -> tuple[float, bytes]:
            started = time.perf_counter()
            if side == "gateway":
                data = gateway.generate(args.size, args.steps, seed)
            else:
                data = direct.generate(PROMPT, height=args.size, width=args.size,
                                       num_inference_steps=args.steps, seed=seed).data
            return time.perf_counter() - started, data

        for seed in range(args.warmup):
            timed("gateway", seed)
            timed("direct", seed)
        seconds: dict[str, list[float]] = {"direct": [], "gateway": []}
        own_ms = []
        same = True
        for i in range(args.repeats):
            seed = args.warmup + i
            order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
            images = {}
            for side in order:
                s, images[side] = timed(side, seed)
                seconds[side].append(s)
            own_ms.append(1000 * (seconds["gateway"][-1] - gateway.upstream_s))
            same &= images["direct"] == images["gateway"]
    gateway.connection.close()
    added_ms = [1000 * (g - d) for g, d in zip(seconds["gateway"], seconds["direct"])]
    return {
        "size": args.size, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
        "direct_grpc": summarize(seconds["direct"]), "gateway": summarize(seconds["gateway"]),
        "added_ms_median": round(statistics.median(added_ms), 2),
        "added_ms_p90": _p90(added_ms),
        "ratio_of_medians": round(statistics.median(seconds["gateway"]) / statistics.median(seconds["direct"]), 4),
        # The round trip less the time the gateway waited for its gRPC call (its server-timing
        # header): HTTP, JSON and base64 on both ends, without the generation's own variance.
        "gateway_own_ms_median": round(statistics.median(own_ms), 2),
        "gateway_own_ms_p90": _p90(own_ms),
        "same_images": same,
        "image_bytes": len(images["direct"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway-url", required=True, help="e.g. http://127.0.0.1:8080")
    parser.add_argument("--grpc-url", required=True, help="the Triton server the gateway uses, e.g. grpc://host:8001")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    key = os.environ.get(KEY_ENV)
    if not key:
        parser.error(f"set ${KEY_ENV} to one of the gateway's API keys")
    result = {**stamp(), "gateway_url": args.gateway_url, "grpc_url": args.grpc_url, **run(args, key)}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
