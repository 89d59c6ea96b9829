"""Why denoising through the server (854 ms per 1024x1024 image) was slower than in-process with
one fixed prompt (766 ms): the shapes the compiled code was made for.

  python -m bench.shapes --out results/raw/shapes.json [--profile-dir results/raw]

The server warms up two sizes and a batch of unequal prompts before it reports ready, so its
compiled blocks are dynamic in batch and sequence length; the in-process rows compiled one
static shape. One engine stays loaded; each row drops the compiled code, compiles it again the
way the row says, times `--repeats` images of one prompt at 1024x1024, and profiles one image
(kernel time by kind and the kernels that took longest). Inductor's on-disk caches are off so
that no row reuses another's kernels.

Outcome on an H200 (bench/results/2026-11-26-h200x2-c): the four rows denoised alike (765 to
770 ms), all with cuDNN's attention kernel; the server had run FlashAttention-2 instead.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from bench.ablation import Bench, profile
from bench.common import config_with, stamp, write_json
from zimage_backend import fusion, optimizations
from zimage_backend.engine import Engine
from zimage_backend.settings import load_settings


def _with_opts(engine: Engine, **changes) -> None:
    engine.settings = dataclasses.replace(engine.settings, optimizations=dataclasses.replace(
        engine.settings.optimizations, **changes))


def _recompile(engine: Engine, dynamic: bool | None) -> None:
    torch._dynamo.reset()
    opts = engine.settings.optimizations
    _with_opts(engine, torch_compile=dataclasses.replace(opts.torch_compile, dynamic=dynamic))
    compile_step = tuple(s for s in optimizations.STEPS if s.switch == "torch_compile")
    optimized = optimizations.optimize(optimizations.Context(
        pipe=engine.pipe, settings=engine.settings, device=engine.device,
        report=optimizations.Report(), run_once=engine._first_run, lora=engine.lora),
        compile_step)
    engine.graphed = optimized.graphed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile-dir", type=Path, default=None)
    parser.add_argument("--load-format", default="dummy", help="tiny: a CPU dry run of the script")
    args = parser.parse_args()
    # No row may reuse another's compiled kernels from Inductor's on-disk caches.
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    cuda = args.load_format == "dummy"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    settings = load_settings(config_with({"model.load_format": args.load_format}))
    engine = Engine(settings, device)  # warms up as the server does
    size = 1024 if cuda else 64
    rows: list[dict] = []
    bench = Bench(engine, size, 8 if cuda else 2, args.repeats,
                  lambda: write_json(args.out, {"rows": rows, **stamp()}))
    shipped_sizes = settings.optimizations.warmup.sizes

    def row(name: str) -> None:
        bench.rows = []
        bench.measure("shapes", name)
        result = bench.rows[0]
        if cuda:
            path = (args.profile_dir or args.out.parent) / f"profile.shapes.{len(rows)}.txt"
            result["profile_ms"] = profile(bench, path, top_kernels=12)
        rows.append(result)
        bench.on_row()

    row("as served: warmup 1024 then 512 (dynamic)")

    _recompile(engine, None)
    _with_opts(engine, warmup=dataclasses.replace(settings.optimizations.warmup,
                                                  sizes=list(reversed(shipped_sizes))))
    engine._warmup()
    row("warmup 512 then 1024 (dynamic, compiled with 1024 as its size hint)")

    # Attention outside the compiled code: SDPA then picks its kernel from the real shapes.
    compile_opts = settings.optimizations.torch_compile
    _with_opts(engine, warmup=settings.optimizations.warmup, torch_compile=dataclasses.replace(
        compile_opts, attention_in_graph=False))
    _recompile(engine, None)
    engine._warmup()
    row("as served, attention outside the compiled code (attention_in_graph false)")
    fusion.set_eager_attention(engine.pipe.transformer, False)
    _with_opts(engine, torch_compile=compile_opts)

    _recompile(engine, False)
    row("static: dynamic=False, compiled on this one prompt and size")


if __name__ == "__main__":
    main()
