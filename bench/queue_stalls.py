"""Sequential requests against a server, and the time Triton says they waited in its queue.

  python -m bench.queue_stalls --url 127.0.0.1:8001 --http-url 127.0.0.1:8000 --requests 80
  (without --url it starts the shipped config.yaml's server itself, with --cpu-instances;
  OMP_NUM_THREADS from this environment reaches its instances)
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

from bench.common import ROOT, stamp, write_json
from zimage_backend.cpu_instances import DEFAULT_CPU_INSTANCES
from zimage_backend.triton_process import TritonServer
from zimage_client import ZImageClient

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def stats_ms(http_url: str, kind: str) -> tuple[int, float]:
    """Requests counted and their milliseconds in `kind` (queue, compute_infer, ...)."""
    with _DIRECT.open(f"http://{http_url}/v2/models/zimage/stats", timeout=10) as response:
        stats = json.load(response)["model_stats"][0]["inference_stats"][kind]
    return int(stats["count"]), stats["ns"] / 1e6


def measure(grpc_url: str, http_url: str, requests: int) -> dict:
    with ZImageClient(grpc_url, inference_timeout_s=120) as client:
        client.generate("warm", height=64, width=64, seed=0)
        time.sleep(1)
        before = {kind: stats_ms(http_url, kind) for kind in ("queue", "compute_infer")}
        seconds = []
        for seed in range(requests):
            started = time.perf_counter()
            client.generate("a cat", height=64, width=64, seed=seed)
            seconds.append(time.perf_counter() - started)
    time.sleep(1)  # Triton counts a request once execute() returns, after its answer
    after = {kind: stats_ms(http_url, kind) for kind in ("queue", "compute_infer")}
    computed = [a - b for a, b in zip(after["compute_infer"], before["compute_infer"])]
    ordered = sorted(seconds)
    return {"requests": requests, "p50_ms": round(ordered[len(ordered) // 2] * 1000, 1),
            "p90_ms": round(ordered[int(len(ordered) * 0.9)] * 1000, 1),
            "over_300_ms": sum(s > 0.3 for s in seconds),
            "triton_queue_ms_total": round(after["queue"][1] - before["queue"][1], 1),
            "triton_compute_ms_per_request": round(computed[1] / max(1, computed[0]), 1),
            "latencies_ms": [round(s * 1000) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="gRPC host:port of a running server")
    parser.add_argument("--http-url", help="its HTTP host:port (the statistics API)")
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--cpu-instances", type=int, default=DEFAULT_CPU_INSTANCES,
                        help="for the server it starts itself (zimage-serve's option)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.url:
        result = measure(args.url, args.http_url, args.requests)
    else:
        with TritonServer(ROOT / "model_repository", config_path=ROOT / "config.yaml",
                          http_port=0, grpc_port=0, metrics_port=0,
                          cpu_instances=args.cpu_instances) as server:
            result = measure(server.grpc_url, server.http_url, args.requests)
        result["cpu_instances"] = args.cpu_instances
    result.update(stamp())
    print({k: v for k, v in result.items() if k != "latencies_ms"})
    write_json(args.out, result)


if __name__ == "__main__":
    main()
