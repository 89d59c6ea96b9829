"""What a user would run instead, in this process: plain diffusers, eager and compiled.

  python -m bench.baselines --variant eager --out results/raw/eager.json
  python -m bench.baselines --variant compiled --weights /path/to/Z-Image-Turbo

Without --weights the full Z-Image-Turbo shape is built with random weights (timing only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import PROMPT, Timer, stamp, summarize, write_json


def load(weights: str | None):
    if weights:
        from diffusers import ZImagePipeline

        return ZImagePipeline.from_pretrained(weights, dtype=torch.bfloat16)
    from zimage_backend.random_models import build_dummy_pipeline

    return build_dummy_pipeline(torch.device("cuda"), torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=("eager", "compiled"), required=True)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    pipe = load(args.weights).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    if args.variant == "compiled":
        # diffusers' recommended recipe: regional compile, compiled VAE decoder, cuDNN SDPA.
        pipe.transformer.set_attention_backend("_native_cudnn")
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        pipe.vae.decoder.compile()

    def generate(seed: int):
        # As the model card shows it: a PIL image out, guidance 0, Turbo's 8 forwards.
        return pipe(prompt=PROMPT, height=args.size, width=args.size,
                    num_inference_steps=args.steps, guidance_scale=0.0,
                    generator=torch.Generator("cuda").manual_seed(seed)).images[0]

    with Timer() as first:
        generate(0)
    times = []
    for i in range(args.repeats):
        with Timer() as t:
            generate(i + 1)
        times.append(t.seconds)
    result = {"system": f"diffusers {args.variant}", "size": args.size, "steps": args.steps,
              "weights": args.weights or "random (dummy)", "first_s": round(first.seconds, 3),
              **summarize(times), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              **stamp()}
    print(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
