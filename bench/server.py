"""Our real Triton server, timed from outside: cold start, end-to-end latency over gRPC with
PNG returned (per stage) at each of --sizes from one start, perf_analyzer throughput, and a warm
restart.

  python -m bench.server --out results/raw/server.json [--weights PATH] [--gpus 0,1]
      [--compile-cache DIR] [--sizes 1024,512,256]

The first of --sizes is the one `latency`, perf_analyzer, --profile and --save-images /
--compare-images use; the others land in `latency_other_sizes`, keyed by size.

Without --weights the server runs the shipped config.yaml with the one line
`model.load_format: dummy` changed (random weights, full Z-Image-Turbo shape).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import (PROMPT, ROOT, config_with, deviation, parse_overrides, stamp,
                          summarize, write_json)
from zimage_backend.engine import PROFILE_ENV
from zimage_backend.triton_process import TritonServer
from zimage_client import ZImageClient


def start(config: Path, log_file: Path, env: dict[str, str]) -> tuple[TritonServer, float]:
    server = TritonServer(ROOT / "model_repository", config_path=config, http_port=0,
                          grpc_port=0, metrics_port=0, log_file=log_file, extra_env=env,
                          ready_timeout_s=1200)
    started = time.perf_counter()
    server.start()
    server.wait_until_ready(1200)
    return server, time.perf_counter() - started


def latency(server: TritonServer, size: int, steps: int, repeats: int) -> dict:
    with ZImageClient(server.grpc_url, protocol="grpc", inference_timeout_s=600) as client:
        def once(seed: int):
            t = time.perf_counter()
            result = client.generate(PROMPT, height=size, width=size, seed=seed,
                                     num_inference_steps=steps)
            return time.perf_counter() - t, result

        first_s, _ = once(0)
        runs = [once(seed) for seed in range(1, repeats + 1)]
    totals = [s for s, _ in runs]
    stages = {}
    for key in ("text_encode", "denoise", "vae_decode", "image_encode"):
        stages[key] = round(statistics.median(r.timings_ms.get(key, 0.0) for _, r in runs), 2)
    server_ms = [r.timings_ms.get("compute", 0) + r.timings_ms.get("image_encode", 0)
                 for _, r in runs]
    overhead = [s * 1000 - m for s, m in zip(totals, server_ms)]
    stages["triton_and_transport"] = round(statistics.median(overhead), 2)
    return {"first_s": round(first_s, 3), **summarize(totals), "stage_ms": stages,
            "weights": runs[0][1].metadata.get("weights")}, [r.pixels for _, r in runs]


# The instance's startup log line (engine): `startup phases (s): {"load": 12.3, ...}`.
STARTUP_PHASES = re.compile(r"startup phases \(s\): (\{.*)")


def startup_phases(log_file: Path) -> dict | None:
    """The startup phases a server log reports, or None where it has none (older engines).
    The last line wins: with several instances it is the last one ready, which ready waited for."""
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    found = None
    for match in STARTUP_PHASES.finditer(text):
        try:
            found, _ = json.JSONDecoder().raw_decode(match.group(1))
        except json.JSONDecodeError:
            print(f"unreadable startup phases in {log_file}: {match.group(0)[:200]}", flush=True)
    return found


def add_startup_phases(result: dict, key: str, log_file: Path) -> None:
    """result[key] = the log's startup phases; no key where the log has none."""
    if (phases := startup_phases(log_file)) is not None:
        result[key] = phases
        print(key, phases, flush=True)


def gpu_processes(log_file: Path) -> dict:
    """Which process holds memory on which GPU (nvidia-smi), and what each instance's allocator
    says it holds per GPU (its startup log line)."""
    def smi(*query: str) -> list[list[str]]:
        run = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60)
        return [[f.strip() for f in line.split(",")] for line in run.stdout.splitlines() if line]

    gpus = {uuid: int(index) for index, uuid in smi("--query-gpu=index,uuid")}
    apps = [{"pid": int(pid), "gpu": gpus.get(uuid), "used_mib": int(used)}
            for pid, uuid, used in smi("--query-compute-apps=pid,gpu_uuid,used_memory")]
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    instances = re.findall(r"instance (\S+) on (cuda:\d+)", text)
    held = re.findall(r"GPU memory held by the instance on \S+: (.*)", text)
    return {"nvidia_smi_apps": apps, "instances": [" ".join(i) for i in instances],
            "allocator_by_gpu": held}


def images_by_device(server: TritonServer) -> dict[str, float]:
    """zimage_images_generated_total per instance device, from Triton's metrics endpoint."""
    text = urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=30).read()
    found = re.findall(r'zimage_images_generated_total\{[^}]*device="([^"]+)"[^}]*\} (\S+)',
                       text.decode())
    return {device: float(value) for device, value in found}


def perf_analyzer(server: TritonServer, size: int, concurrencies: list[int],
                  window_requests: int, out_dir: Path, log: Path) -> list[dict]:
    """Images per minute per concurrency. Each window ends after `window_requests` answers
    (perf_analyzer's count windows): with answers a second apart, time windows of a few
    seconds miscount by one answer in a few."""
    data = json.loads((ROOT / "perf" / "inputs.json").read_text())
    for row in data["data"]:
        row.update(HEIGHT=[size], WIDTH=[size])
    inputs = out_dir / f"inputs_{size}.json"
    inputs.write_text(json.dumps(data))
    rows = []
    for c in concurrencies:
        run = subprocess.run(
            [str(ROOT / "perf" / "perf_analyzer.sh"), str(inputs), "-i", "grpc", "-u",
             server.grpc_url, "--concurrency-range", f"{c}:{c}", "--measurement-mode",
             "count_windows", "--measurement-request-count", str(max(window_requests, 2 * c)),
             # Three windows of a fixed size are the sample; perf_analyzer's stability test
             # only decides when to stop, and a fixed sample needs none.
             "--stability-percentage", "1000", "--max-trials", "5"],
            capture_output=True, text=True, timeout=900)
        text = run.stdout + run.stderr
        with log.open("a") as handle:  # kept beside the results: a failed run says why
            handle.write(f"=== concurrency {c}, exit {run.returncode}\n{text}\n")
        throughput = re.findall(r"Throughput: ([\d.]+) infer/sec", text)
        latency_us = re.findall(r"Avg latency: (\d+) usec", text)
        rows.append({"concurrency": c, "ok": run.returncode == 0,
                     "images_per_min": round(float(throughput[-1]) * 60, 2) if throughput
                     else None,
                     "avg_latency_s": round(int(latency_us[-1]) / 1e6, 3) if latency_us
                     else None})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default=None, help="a local Z-Image-Turbo folder")
    parser.add_argument("--load-format", default="dummy", help="tiny: a CPU dry run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES for the server")
    parser.add_argument("--sizes", default="1024",
                        help="square sizes timed from one start, e.g. 1024,512,256; the first "
                        "is perf_analyzer's and the saved or compared images'")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", default="10",
                        help="timed requests per size: one number, or one per size (10,20,20)")
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--window-requests", type=int, default=12,
                        help="answers per perf_analyzer window (three windows make a figure)")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="Inductor cache to use and keep (default: a fresh one); the "
                        "first start is cold only while it is empty")
    parser.add_argument("--small-concurrency", default="",
                        help="also load-test 512x512 at these concurrencies (batching)")
    parser.add_argument("--no-restart", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="one more request after the timed ones, profiled by the instance")
    parser.add_argument("--save-images", type=Path, default=None,
                        help="an .npz of the timed images (seeds 1..repeats)")
    parser.add_argument("--compare-images", type=Path, default=None,
                        help="another run's --save-images: the deviation of this run's images "
                        "from those of the same seeds (FP8 against bf16)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    repeats = [int(r) for r in args.repeats.split(",") if r]
    if not sizes or len(repeats) not in (1, len(sizes)):
        parser.error(f"--sizes {args.sizes!r} with --repeats {args.repeats!r}: give at least one "
                     "size, and one repeat count or one per size")
    repeats = repeats * len(sizes) if len(repeats) == 1 else repeats
    size = sizes[0]

    overrides = ({"model.load_format": "auto", "model.source": args.weights} if args.weights
                 else {"model.load_format": args.load_format})
    overrides.update(parse_overrides(args.set))
    config = config_with(overrides)
    work = Path(tempfile.mkdtemp(prefix="zimage-bench-"))
    # A fresh compile cache makes the first start cold; the restart reuses it.
    cache = args.compile_cache or work / "inductor-cache"
    # Triton's own kernel cache (kernels launched outside Inductor's, e.g. qk_norm_rope) lives in
    # it too: an earlier run on the same machine must not make a cold start warm.
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    if args.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.gpus
    if args.profile:  # the call after the first and the timed requests
        env[PROFILE_ENV] = str(sum(repeats) + len(sizes) + 1)
    result = {"system": "zimage on Triton (gRPC, PNG)", "overrides": overrides,
              "size": size, "sizes": sizes, "steps": args.steps, "gpus": args.gpus, **stamp()}
    cold = not (cache.exists() and any(cache.iterdir()))
    first_start = "cold_start_s" if cold else "start_with_cache_s"
    server, result[first_start] = start(config, work / "server_cold.log", env)
    try:
        print(first_start, result[first_start], flush=True)
        if args.load_format != "tiny":
            result["gpu_processes"] = gpu_processes(work / "server_cold.log")
            print(result["gpu_processes"], flush=True)
        result["latency"], images = latency(server, size, args.steps, repeats[0])
        print(size, result["latency"], flush=True)
        for other, n in zip(sizes[1:], repeats[1:]):
            result.setdefault("latency_other_sizes", {})[str(other)], _ = latency(
                server, other, args.steps, n)
            print(other, result["latency_other_sizes"][str(other)], flush=True)
        if args.save_images:  # seeds 1..repeats, for another run's --compare-images
            args.save_images.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.save_images, *images)
        if args.compare_images and not args.compare_images.exists():
            # A fresh machine lacks the bf16 run's images: keep the timings, say so.
            print(f"no {args.compare_images}: no deviation measured", flush=True)
        elif args.compare_images:
            with np.load(args.compare_images) as saved:
                reference = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            n = min(len(reference), len(images))
            result["deviation_from_reference"] = {
                "reference": str(args.compare_images), "images": n,
                **deviation(images[:n], reference[:n])}
            print("deviation", result["deviation_from_reference"], flush=True)
        if args.profile:
            with ZImageClient(server.grpc_url, protocol="grpc", inference_timeout_s=600) as c:
                c.generate(PROMPT, height=size, width=size,
                           num_inference_steps=args.steps)
            time.sleep(1)  # the stub's log line reaches the server's log file late
            text = (work / "server_cold.log").read_text(errors="replace")
            result["served_profile"] = re.findall(r"profile of call .*", text)
            print(result["served_profile"], flush=True)
        concurrencies = [int(c) for c in args.concurrency.split(",") if c]
        before = images_by_device(server)
        result["perf_analyzer"] = perf_analyzer(server, size, concurrencies,
                                                args.window_requests, work,
                                                args.out.with_suffix(".perf_analyzer.log"))
        # How evenly Triton spread the load test over the instances.
        result["images_by_device"] = {d: n - before.get(d, 0.0)
                                      for d, n in images_by_device(server).items()}
        print("images by device", result["images_by_device"], flush=True)
        if args.small_concurrency:
            small = [int(c) for c in args.small_concurrency.split(",") if c]
            result["perf_analyzer_512"] = perf_analyzer(
                server, 512, small, args.window_requests, work,
                args.out.with_suffix(".perf_analyzer.log"))
    finally:
        server.stop()
    # Read once the server stopped: the stub's log lines reach the log file late.
    add_startup_phases(result, "startup_phases_cold" if cold else "startup_phases_with_cache",
                       work / "server_cold.log")
    if not args.no_restart:
        server, result["warm_restart_s"] = start(config, work / "server_warm.log", env)
        server.stop()
        print("warm restart", result["warm_restart_s"], flush=True)
        add_startup_phases(result, "startup_phases_warm", work / "server_warm.log")
    result["logs"] = str(work)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
