"""LoRA adapters timed: no adapter, one, two mixed, and the first request after a switch, with
the recompiles the switches caused. Writes lora.json (`latency_s` per case,
`recompiles_on_switch`).

  python -m bench.lora --out results/raw/lora.json             # in-process engine, dummy model
  python -m bench.lora --server --out results/raw/lora.json    # through our Triton server
  python -m bench.lora --load-format tiny --size 64 --steps 2 --out /tmp/lora.json   # CPU check

Two rank-32 adapters with real key names and shapes (random factors, every block's attention
and feed-forward products and adaLN) are written as safetensors to a temp folder, in kohya and
diffusers format, and the shipped config.yaml gets a registry pointing at them. Without
adapters configured nothing is wrapped; `no_adapters_configured` times that server too (in
process: a second engine, built first and freed).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (PROMPT, ROOT, Timer, config_with, parse_overrides, stamp, summarize,
                          write_json)
from zimage_backend import random_adapters, random_models
from zimage_backend.settings import load_settings

SETS = {
    "no_adapter": (),
    "one_adapter": (("style", 1.0),),
    "two_mixed": (("detail", 0.5), ("style", 0.8)),
}
# Each request names another set than the one before it, so each is a first after a switch.
SWITCHES = [SETS["one_adapter"], SETS["two_mixed"], (("detail", 1.0),), SETS["no_adapter"]]


def _transformer_shapes(load_format: str) -> dict[str, tuple[int, int]]:
    if load_format == "tiny":
        return random_adapters.module_shapes(random_models.build_tiny_pipeline(0).transformer)
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**random_models.architecture_config("transformer"))
    return random_adapters.module_shapes(transformer)


def write_adapters(folder: Path, load_format: str, rank: int) -> dict[str, dict]:
    """Two adapters as a registry: `style` (kohya, alpha = rank) and `detail` (diffusers)."""
    shapes = _transformer_shapes(load_format)
    files = {
        "style": random_adapters.write(folder / "style.safetensors", random_adapters.factors(
            shapes, rank, seed=1), "kohya", alpha=float(rank), dtype=torch.bfloat16),
        "detail": random_adapters.write(folder / "detail.safetensors", random_adapters.factors(
            shapes, rank, seed=2), "diffusers", dtype=torch.bfloat16),
    }
    return {name: {"source": str(path), "file": None, "revision": None, "scale": 1.0}
            for name, path in files.items()}


def _case_times(run, adapter_set, repeats: int) -> list[float]:
    run(adapter_set)  # switch into the set: not timed
    return [run(adapter_set) for _ in range(repeats)]


def _switch_times(run, repeats: int) -> list[float]:
    return [run(SWITCHES[i % len(SWITCHES)]) for i in range(repeats)]


def in_process(config: Path, baseline: Path, args) -> dict:
    from zimage_backend.engine import Engine
    from zimage_backend.request import GenerationRequest

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def timer(engine):
        def run(adapter_set) -> float:
            request = GenerationRequest(prompt=PROMPT, height=args.size, width=args.size,
                                        num_inference_steps=args.steps, guidance_scale=0.0,
                                        seed=0, output_format="raw", loras=adapter_set)
            with Timer() as t:
                engine.run([request])
            return t.seconds
        return run

    latency = {}
    if args.baseline:
        plain = Engine(load_settings(baseline), device)
        latency["no_adapters_configured"] = _case_times(timer(plain), (), args.repeats)
        del plain
        if device.type == "cuda":
            torch.cuda.empty_cache()
    engine = Engine(load_settings(config), device)
    run = timer(engine)
    for name, adapter_set in SETS.items():
        latency[name] = _case_times(run, adapter_set, args.repeats)
    compiled = engine.report.status("torch_compile") == "applied"
    before = _compiles()
    latency["first_after_switch"] = _switch_times(run, args.repeats)
    bank = engine.lora
    return {"latency": latency, "recompiles_on_switch": _compiles() - before,
            "torch_compile": engine.report.status("torch_compile"),
            "recompiles_counted_by": "torch._dynamo.utils.counters['stats']['unique_graphs']"
            if compiled else "nothing compiled (CPU)",
            "adapter_device_mib": {n: round(f.device_bytes / 2**20, 1)
                                   for n, f in bank.adapters.items()},
            "slot_buffers_mib": round(bank.buffer_bytes / 2**20, 1),
            "wrapped_products": len(bank.layers), "slots": bank.slots, "rank": bank.rank}


def _compiles() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def through_server(config: Path, baseline: Path, args) -> dict:
    from zimage_backend.triton_process import TritonServer
    from zimage_client import ZImageClient

    env = {"TORCH_LOGS": "recompiles"}  # each recompile in the instance writes a log line
    if args.compile_cache is not None:
        # The second server reuses what the first compiled (text encoder, VAE decoder).
        env["TORCHINDUCTOR_CACHE_DIR"] = str(args.compile_cache)

    def serve(path: Path, log: Path):
        return TritonServer(ROOT / "model_repository", config_path=path, http_port=0,
                            grpc_port=0, metrics_port=0, log_file=log, ready_timeout_s=1200,
                            extra_env=env)

    def timer(client):
        def run(adapter_set) -> float:
            t = time.perf_counter()
            client.generate(PROMPT, height=args.size, width=args.size, seed=0,
                            num_inference_steps=args.steps, loras=dict(adapter_set) or None)
            return time.perf_counter() - t
        return run

    folder, latency = Path(tempfile.mkdtemp(prefix="zimage-lora-serve-")), {}
    if args.baseline:
        with serve(baseline, folder / "plain.log") as server, ZImageClient(
                server.grpc_url, protocol="grpc", inference_timeout_s=600) as client:
            latency["no_adapters_configured"] = _case_times(timer(client), (), args.repeats)
    log = folder / "lora.log"
    with serve(config, log) as server, ZImageClient(
            server.grpc_url, protocol="grpc", inference_timeout_s=600) as client:
        run = timer(client)
        for name, adapter_set in SETS.items():
            latency[name] = _case_times(run, adapter_set, args.repeats)
        before = _recompile_lines(log)
        latency["first_after_switch"] = _switch_times(run, args.repeats)
        recompiles = _recompile_lines(log) - before
        listing = client.adapters()
    text = log.read_text(errors="replace")
    # A server that fell back to eager code would time something else than the shipped config.
    compile_outcome = {path.stem: re.findall(r"optimization torch_compile\s+(\w+)",
                                             path.read_text(errors="replace"))
                       for path in (folder / "plain.log", log) if path.exists()}
    return {"latency": latency, "recompiles_on_switch": recompiles,
            "torch_compile": compile_outcome,
            "recompiles_counted_by": "'Recompiling function' lines (TORCH_LOGS=recompiles)",
            "startup_log": re.findall(r"zimage_backend\.adapters: (.*)", text),
            "listing": listing}


def _recompile_lines(log: Path) -> int:
    return log.read_text(errors="replace").count("Recompiling function")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", action="store_true", help="through our Triton server")
    parser.add_argument("--load-format", default="dummy", choices=("dummy", "tiny"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="with --server: TORCHINDUCTOR_CACHE_DIR shared by both servers")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the server without adapters configured")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config.yaml override for both servers, e.g. optimizations.fp8=true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="zimage-lora-"))
    registry = write_adapters(folder, args.load_format, args.rank)
    base = {"model.load_format": args.load_format,
            "optimizations.warmup.sizes": [[args.size, args.size]], **parse_overrides(args.set)}
    config = config_with({**base, "adapters": registry})
    baseline = config_with(base)
    measured = (through_server if args.server else in_process)(config, baseline, args)
    latency = measured.pop("latency")
    medians = {case: round(statistics.median(times), 4) for case, times in latency.items()}
    reference = medians.get("no_adapters_configured", medians["no_adapter"])
    result = {
        "system": "zimage " + ("server (gRPC, PNG)" if args.server else "engine (in-process)"),
        "load_format": args.load_format, "size": args.size, "steps": args.steps,
        "rank": args.rank, "overrides": args.set, "latency_s": medians,
        "ratio_to_no_adapters": {case: round(m / reference, 4) for case, m in medians.items()},
        "runs": {case: summarize(times) for case, times in latency.items()},
        **measured, **stamp(),
    }
    print({k: result[k] for k in ("latency_s", "ratio_to_no_adapters", "recompiles_on_switch")})
    write_json(args.out, result)


if __name__ == "__main__":
    main()
