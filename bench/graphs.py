"""The transformer's CUDA graphs for small images, in this process with the shipped config.yaml
(dummy weights): at each size the engine as served (graphs where the pool admits the call), the
same compiled code without graphs, and eager code; the images of the first two compared with
eager's on the same seeds, and the memory each graph key's recording added.

  python -m bench.graphs --out results/raw/graphs.json
  python -m bench.graphs --load-format tiny --device cpu --sizes 64 --steps 2 --repeats 1 \
      --out /tmp/graphs.json   # a CPU dry run: no compile, so no graphs
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from bench.common import PROMPT, config_with, deviation, parse_overrides, stamp, summarize, \
    write_json
from zimage_backend.engine import Engine
from zimage_backend.request import GenerationRequest
from zimage_backend.settings import load_settings


@contextlib.contextmanager
def without_graphs(engine: Engine):
    pool, engine.graph_pool = engine.graph_pool, None
    try:
        yield
    finally:
        engine.graph_pool = pool


@contextlib.contextmanager
def eager(engine: Engine):
    """Every compiled module runs its eager code for the duration."""
    compiled = {m: m._compiled_call_impl for part in engine.pipe.components.values()
                if isinstance(part, torch.nn.Module) for m in part.modules()
                if m._compiled_call_impl is not None}
    try:
        for module in compiled:
            module._compiled_call_impl = None
        with without_graphs(engine):
            yield
    finally:
        for module, call in compiled.items():
            module._compiled_call_impl = call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    overrides = {"model.load_format": args.load_format, **parse_overrides(args.set)}
    settings = load_settings(config_with(overrides))
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    started = time.perf_counter()
    engine = Engine(settings, device)
    result = {"system": "zimage engine (in-process): transformer CUDA graphs",
              "overrides": overrides, "steps": args.steps,
              "ready_s": round(time.perf_counter() - started, 2),
              "optimizations": engine.report.as_dict(), "sizes": {}}

    def request(size: int, seed: int) -> GenerationRequest:
        return GenerationRequest(prompt=PROMPT, height=size, width=size,
                                 num_inference_steps=args.steps, guidance_scale=0.0, seed=seed,
                                 output_format="raw")

    def timed(size: int) -> tuple[dict, list]:
        engine.run([request(size, 0)])  # untimed: a new caption bucket records here
        runs = []
        for seed in range(1, args.repeats + 1):
            t = time.perf_counter()
            out = engine.run([request(size, seed)])
            runs.append((time.perf_counter() - t, out))
        images = [out.pixels[0] for _, out in runs]
        return {**summarize([s for s, _ in runs]),
                "denoise_ms": round(statistics.median(o.timings_ms["denoise"] for _, o in runs), 2),
                "cuda_graphs": sorted({o.cuda_graphs for _, o in runs})}, images

    for size in (int(s) for s in args.sizes.split(",")):
        served, served_images = timed(size)
        with without_graphs(engine):
            plain, plain_images = timed(size)
        with eager(engine):
            reference = [engine.run([request(size, seed)]).pixels[0]
                         for seed in range(1, min(args.repeats, 3) + 1)]
        n = len(reference)
        row = {"served": served, "compiled_without_graphs": plain,
               "served_vs_without_graphs": round(served["median_s"] / plain["median_s"], 3),
               "served_vs_eager_images": deviation(served_images[:n], reference),
               "without_graphs_vs_eager_images": deviation(plain_images[:n], reference),
               "served_vs_without_graphs_images": deviation(served_images, plain_images)}
        result["sizes"][str(size)] = row
        print(size, row, flush=True)
    if engine.graph_pool is not None:
        result["graph_keys_mib"] = {" ".join(map(str, k)): round(v / 2**20, 1)
                                    for k, v in engine.graph_pool.memory.items()}
    if device.type == "cuda":
        result["reserved_gib"] = round(torch.cuda.memory_reserved(device) / 2**30, 2)
    result.update(stamp())
    write_json(args.out, result)


if __name__ == "__main__":
    main()
