"""Our engine in this process, with the shipped config.yaml and optional overrides: stage
times without Triton, for ablations (one switch flipped per run) and the FP8/memory modes.

  python -m bench.engine --out results/raw/engine.json
  python -m bench.engine --set optimizations.tf32=false --out results/raw/tf32_off.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.common import PROMPT, Timer, config_with, parse_overrides, stamp, summarize, write_json
from zimage_backend.encoding import encode_image
from zimage_backend.engine import Engine
from zimage_backend.request import GenerationRequest
from zimage_backend.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config.yaml override; model.load_format defaults to dummy")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    overrides = {"model.load_format": "dummy", **parse_overrides(args.set)}
    settings = load_settings(config_with(overrides))
    started = time.perf_counter()
    engine = Engine(settings, torch.device("cuda", 0))
    ready_s = time.perf_counter() - started
    # The peak of serving, not of building: the dummy weights are made on the GPU even when a
    # memory mode then moves them off it.
    torch.cuda.reset_peak_memory_stats()

    def generate(seed: int) -> dict[str, float]:
        requests = [GenerationRequest(prompt=PROMPT, height=args.size, width=args.size,
                                      num_inference_steps=args.steps, guidance_scale=0.0,
                                      seed=seed + i, output_format="png")
                    for i in range(args.batch)]
        result = engine.run(requests)
        t = time.perf_counter()
        for pixels in result.pixels:
            encode_image(pixels, "png", settings.encoding)
        return {**result.timings_ms, "image_encode": (time.perf_counter() - t) * 1000}

    with Timer() as first:
        generate(0)
    times, stages = [], []
    for i in range(args.repeats):
        with Timer() as t:
            stages.append(generate(i + 1))
        times.append(t.seconds)
    stage_ms = {k: round(statistics.median(s[k] for s in stages), 2) for k in stages[0]}
    result = {"system": "zimage engine (in-process)", "overrides": overrides,
              "size": args.size, "steps": args.steps, "batch": args.batch,
              "ready_s": round(ready_s, 2), "first_s": round(first.seconds, 3),
              **summarize(times), "stage_ms": stage_ms,
              "images_per_s": round(args.batch / statistics.median(times), 3),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "optimizations": engine.report.as_dict(), **stamp()}
    print({k: v for k, v in result.items() if k != "optimizations"})
    write_json(args.out, result)


if __name__ == "__main__":
    main()
