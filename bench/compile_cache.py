"""Does a compile cache written by one way of building the pipeline serve another? (issue 15,
point 5: a server loading a saved folder with `load_format: auto` missed the cache a dummy run
had written.) On the CPU with the tiny pipeline, each case in a fresh process sharing one
TORCHINDUCTOR_CACHE_DIR: the transformer's repeated blocks compiled as the engine compiles them,
one denoising step at 64x64, and torch's cache counters (AOTAutograd and Inductor's FX graphs).

  python -m bench.compile_cache --out bench/results/<run>/compile_cache.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, stamp, write_json

CASES = {
    "built": "built in memory and frozen, as the dummy format builds it",
    "loaded": "saved with save_pretrained and loaded through the engine's load_pipeline",
    "loaded_unfrozen": "loaded with ZImagePipeline.from_pretrained alone (parameters left "
                       "requiring grad: the engine before this change)",
}


def child(case: str, folder: str) -> dict:
    import torch
    from diffusers import ZImagePipeline
    from torch._dynamo.utils import counters

    from zimage_backend import engine, random_models
    from zimage_backend.settings import load_settings

    if case == "built":
        pipe = random_models.freeze_weights(random_models.build_tiny_pipeline(seed=0))
    elif case == "loaded":
        settings = load_settings(ROOT / "config.yaml")
        settings = dataclasses.replace(settings, model=dataclasses.replace(
            settings.model, load_format="auto", source=folder))
        pipe = engine.load_pipeline(settings, torch.device("cpu"), torch.float32)
    else:
        pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
    for block in pipe.transformer.modules():
        if type(block).__name__ in pipe.transformer._repeated_blocks:
            block.compile()
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(prompt="a cat", height=64, width=64, num_inference_steps=1, guidance_scale=0.0,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    wanted = ("autograd_cache_hit", "autograd_cache_miss", "fxgraph_cache_hit",
              "fxgraph_cache_miss")
    found = {k: v for group in ("aot_autograd", "inductor")
             for k, v in counters[group].items() if k in wanted}
    return {"case": case, "what": CASES[case], "seconds": round(time.perf_counter() - started, 2),
            **{k: found.get(k, 0) for k in wanted}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--child", choices=sorted(CASES))
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder)))
        return
    from zimage_backend import random_models

    work = Path(tempfile.mkdtemp(prefix="zimage-cache-"))
    folder = random_models.ensure_tiny_pipeline(work / "pipeline", seed=0)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    runs = []
    # A dummy run writes the cache; the loaded cases then start from it, as a restart would.
    for case in ("built", "loaded", "loaded", "loaded_unfrozen"):
        out = subprocess.run([sys.executable, "-m", "bench.compile_cache", "--child", case,
                              "--folder", str(folder)], env=env, capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    result = {"what": "one compile cache, written by the first run, read by the others (tiny "
                      "pipeline, CPU, transformer blocks compiled, one step at 64x64)",
              "runs": runs, **stamp()}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
