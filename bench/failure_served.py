"""The failure paths through the real Triton server on a GPU: out of memory, then a broken device.

1. Calibration: a server without a memory budget serves one normal image; the most its allocator
   held (the `zimage_gpu_memory_bytes` gauge) plus a margin is the budget, so the large image
   cannot fit on any card.
2. Out of memory: a server with that budget (`limits.gpu_memory_gib`) serves a normal image,
   then the large one (RESOURCE_EXHAUSTED expected), then a normal one again; the gauges before
   and after the failure go to `oom_served.json`.
3. Broken device: the same server was started with ZIMAGE_FAULT_CALL, so its next pipeline call
   hits a real device-side assert; that request must get UNAVAILABLE and the model must stop
   being ready (Triton's readiness), which goes to `broken_served.json`.

HTTP/JSON only (urllib), so it needs no tritonclient on the GPU machine.

  python -m bench.failure_served --out-dir bench/results/<run>
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.error
from pathlib import Path

from bench.common import DIRECT, config_with, infer_over_http, stamp, write_json
from bench.server import start
from zimage_backend.triton_process import TritonServer

GIB = 2**30


def infer(server: TritonServer, prompt: str, size: int, steps: int, seed: int) -> dict:
    """One request over HTTP/JSON; the answer as {ok, status, message, metadata, seconds}."""
    body = {"inputs": [
        {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
        {"name": "HEIGHT", "shape": [1, 1], "datatype": "INT32", "data": [size]},
        {"name": "WIDTH", "shape": [1, 1], "datatype": "INT32", "data": [size]},
        {"name": "NUM_INFERENCE_STEPS", "shape": [1, 1], "datatype": "INT32", "data": [steps]},
        {"name": "SEED", "shape": [1, 1], "datatype": "INT64", "data": [seed]}],
        "outputs": [{"name": "METADATA"}, {"name": "IMAGE", "parameters": {"binary_data": True}}]}
    started = time.perf_counter()
    try:
        seconds, answer, image_bytes = infer_over_http(
            server.http_url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    except urllib.error.HTTPError as exc:
        message = json.loads(exc.read() or b"{}").get("error", "")
        return {"ok": False, "status": exc.code, "message": message,
                "seconds": round(time.perf_counter() - started, 3)}
    metadata = next(o for o in answer["outputs"] if o["name"] == "METADATA")["data"][0]
    return {"ok": True, "status": 200, "metadata": json.loads(metadata),
            "image_bytes": image_bytes, "seconds": round(seconds, 3)}


def memory_gib(server: TritonServer) -> dict[str, float]:
    with DIRECT.open(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {kind: float(value) / GIB for kind, value in re.findall(
        r'^zimage_gpu_memory_bytes\{[^}]*kind="(\w+)"[^}]*\} (\S+)$', text, re.M)}
    return {kind: round(value, 3) for kind, value in found.items()}


def model_ready(server: TritonServer) -> bool:
    try:
        with DIRECT.open(f"http://{server.http_url}/v2/models/zimage/ready", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", type=int, default=2048, help="side of the image that must "
                        "not fit")
    parser.add_argument("--normal", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--margin-gib", type=float, default=0.5,
                        help="budget: what a normal image held, plus this")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/zimage-failure-served"))
    parser.add_argument("--load-format", default="dummy", help="tiny: a CPU dry run of the "
                        "script (no memory budget there)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # VAE tiling off: decoding a large image whole is what does not fit (a tiled decode of
    # 2048x2048 held no more than 1024x1024 did).
    base = {"model.load_format": args.load_format, "optimizations.torch_compile.enabled": False,
            "optimizations.vae_tiling": False,
            "optimizations.warmup.sizes": [[args.normal, args.normal]],
            "optimizations.warmup.num_inference_steps": 1,
            "limits.max_size": max(2048, args.large),
            "limits.max_pixels": max(2048, args.large) ** 2}

    # 1. The most a normal image holds while serving, without a budget. The budget leaves a
    # little more than that: a budget halfway to what the large image held without one (28.5
    # GiB) still let it through, cuDNN falling back to convolutions that need less workspace
    # (bench/results/2026-12-01-h200/NOTES.md).
    server, _ = start(config_with(base), args.work / "calibrate.log", {})
    try:
        normal = infer(server, "calibration", args.normal, args.steps, 1)
        held_normal = memory_gib(server)
    finally:
        server.stop()
    if not normal["ok"]:
        raise SystemExit(f"calibration failed: {normal}")
    budget = round(held_normal["max_reserved"] + args.margin_gib, 2) \
        if held_normal else None  # no gauges on a CPU instance

    # 2 and 3. The budget; the fourth pipeline call after ready breaks the device.
    server, _ = start(config_with({**base, "limits.gpu_memory_gib": budget}),
                      args.work / "budget.log", {"ZIMAGE_FAULT_CALL": "4"})
    try:
        first = infer(server, "a normal image", args.normal, args.steps, 3)
        before = memory_gib(server)
        huge = infer(server, "too large", args.large, args.steps, 4)
        after = memory_gib(server)
        following = infer(server, "a normal image again", args.normal, args.steps, 5)
        after_following = memory_gib(server)
        oom = {
            "what": (f"{args.normal}x{args.normal}, then {args.large}x{args.large} under a "
                     f"{budget} GiB budget, then {args.normal}x{args.normal} again; "
                     f"{args.steps} steps, dummy weights, compile and VAE tiling off, "
                     "HTTP/JSON"),
            "budget_gib": budget, "calibration": {"normal": held_normal},
            "reserved_before_gib": before.get("reserved"),
            "allocated_before_gib": before.get("allocated"),
            "reserved_after_gib": after.get("reserved"),
            "allocated_after_gib": after.get("allocated"),
            "reserved_after_next_gib": after_following.get("reserved"),
            "large_answer": huge, "first_request_ok": first["ok"],
            "next_request_ok": following["ok"], "next_request": following,
            "server_ready_after": server.is_ready(), **stamp()}
        write_json(args.out_dir / "oom_served.json", oom)
        print(json.dumps({k: v for k, v in oom.items() if k.endswith(("gib", "ok"))}))

        broken = infer(server, "the call that breaks the device", args.normal, args.steps, 6)
        waited, deadline = time.perf_counter(), time.monotonic() + 60
        while model_ready(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        unready_s = round(time.perf_counter() - waited, 2)
        later = infer(server, "after the break", args.normal, args.steps, 7)
        result = {"what": "a device-side assert in the 4th pipeline call (ZIMAGE_FAULT_CALL=4)",
                  "broken_answer": broken, "model_ready_after": model_ready(server),
                  "seconds_until_not_ready": unready_s, "later_answer": later,
                  "server_process_running": server.is_running(), **stamp()}
        write_json(args.out_dir / "broken_served.json", result)
        print(json.dumps(result)[:2000])
    finally:
        server.stop()
        for log in args.work.glob("*.log"):
            (args.out_dir / log.name).write_text(log.read_text(errors="replace")[-200_000:])


if __name__ == "__main__":
    main()
