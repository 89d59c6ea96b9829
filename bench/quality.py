"""FP8 against bf16 on the same prompts and seeds, through our Engine in this process: PSNR,
SSIM and, where the `lpips` package and its weights are present, LPIPS, with a pass mark.

  python -m bench.quality --weights /models/Z-Image-Turbo --out quality.json   # real weights
  python -m bench.quality --out quality.json                   # dummy: random weights, GPU 0
  python -m bench.quality --load-format tiny --out q.json      # CPU dry run (FP8 is skipped)

The pass mark is vLLM-Omni's FP8 quality gate for Z-Image-Turbo (vllm-omni #3929,
tests/diffusion/quantization/test_quantization_quality.py): LPIPS at most 0.15 against bf16 on
the same seed; its passing run measured LPIPS 0.129 and PSNR 20.1 dB, so PSNR must reach 20 dB
too. It has no SSIM mark: SSIM is reported, not judged. Random weights say nothing about FP8
quality: their activations lack the outliers of trained ones, which is what breaks FP8.
"""

from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import config_with, parse_overrides, stamp, write_json
from zimage_backend.engine import Engine
from zimage_backend.request import GenerationRequest
from zimage_backend.settings import load_settings

# Varied on purpose: photo, text in the image, Chinese, a crowd, fine texture, a flat
# illustration, a long prompt, a portrait.
PROMPTS = (
    "a photo of a red fox in fresh snow, golden hour, 85mm, highly detailed",
    'a neon sign above a ramen shop that reads "OPEN LATE", rainy night street',
    "一只橘猫坐在窗台上，窗外是下雪的京都街道，水彩画",
    "a crowded market square in Marrakech at noon, wide angle, many people",
    "macro photograph of frost crystals on a green leaf, shallow depth of field",
    "flat vector illustration of a lighthouse, three colors, minimal",
    "A breathtaking twilight scene atop floating crystalline islands in a nebula sky, "
    "waterfalls of starlight, an overgrown observatory of white stone, bioluminescent trees, "
    "a young astronomer in robes lit by a holographic star chart, cinematic volumetric light",
    "studio portrait of an elderly woman with silver hair, soft window light, film grain",
)
SEEDS = (11, 23, 37, 41, 53, 67, 79, 97)
MAX_LPIPS = 0.15  # vllm-omni #3929's gate
MIN_PSNR_DB = 20.0  # #3929's passing run: 20.1 dB
RANDOM_WARNING = ("RANDOM WEIGHTS: these figures say nothing about FP8 quality; trained "
                  "weights have the activation outliers that break FP8, random ones do not. "
                  "Run with --weights <folder> for a verdict.")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB; inf when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 HxWxC images (Wang et al. 2004: an 11-tap Gaussian
    window of sigma 1.5, K1 0.01, K2 0.03), each channel's map averaged over the valid area."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def planes(x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float64)
        return (x[..., None] if x.ndim == 2 else x).permute(2, 0, 1)[:, None]  # C,1,H,W

    x, y = planes(a), planes(b)
    g = _gaussian()
    size = g.numel()
    if min(x.shape[-2:]) < size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} pixels; SSIM needs at least "
                         f"{size}x{size}")

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    score = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(score.mean())


def lpips_scorer():
    """LPIPS (AlexNet) as a function of two uint8 images, or why it cannot run here: the
    `lpips` package fetches its backbone's weights on first use, which needs a network or a
    filled torch hub cache."""
    try:
        import lpips

        model = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as exc:  # noqa: BLE001 - any failure means no LPIPS, said in the output
        return None, f"LPIPS skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def score(a: np.ndarray, b: np.ndarray) -> float:
        def tensor(x):  # [-1, 1], 1x3xHxW, as lpips expects
            return torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1

        with torch.no_grad():
            return float(model(tensor(a), tensor(b)).item())
    return score, None


def generate(settings, device: torch.device, size: int, steps: int) -> tuple[list, dict]:
    engine = Engine(settings, device)
    images = [engine.run([GenerationRequest(
        prompt=prompt, height=size, width=size, num_inference_steps=steps,
        guidance_scale=settings.defaults.guidance_scale, seed=seed, output_format="raw",
    )]).pixels[0] for prompt, seed in zip(PROMPTS, SEEDS)]
    report = engine.report.as_dict()
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images, report


def verdict(rows: list[dict], lpips_note: str | None, fp8_status: str) -> dict:
    mean_psnr = float(np.mean([r["psnr_db"] for r in rows]))
    worst_lpips = None if lpips_note else max(r["lpips"] for r in rows)
    if fp8_status != "applied":
        result = f"not judged: fp8 was {fp8_status}, both runs are bf16"
    elif worst_lpips is None:
        result = "not judged: no LPIPS here"
    else:
        result = "pass" if worst_lpips <= MAX_LPIPS and mean_psnr >= MIN_PSNR_DB else "fail"
    return {"result": result, "mean_psnr_db": round(mean_psnr, 2),
            "mean_ssim": round(float(np.mean([r["ssim"] for r in rows])), 4),
            "worst_lpips": worst_lpips, "mark": {"max_lpips": MAX_LPIPS,
                                                 "min_mean_psnr_db": MIN_PSNR_DB}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, default=None,
                        help="a saved Z-Image-Turbo folder (load_format auto); none: random")
    parser.add_argument("--load-format", default="dummy", choices=("dummy", "tiny"),
                        help="without --weights; tiny: a CPU dry run of the script")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config.yaml override for the FP8 run, e.g. "
                             "optimizations.fp8_text_encoder=true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model = ({"model.load_format": "auto", "model.source": str(args.weights)} if args.weights
             else {"model.load_format": args.load_format})
    random_weights = args.weights is None
    device = torch.device("cpu") if args.load_format == "tiny" and random_weights else \
        torch.device("cuda", 0)
    # Eager and without warmup: numerics, not speed; compiling twice would take minutes.
    base = {**model, "optimizations.torch_compile.enabled": False,
            "optimizations.warmup.enabled": False}
    bf16_settings = load_settings(config_with({**base, "optimizations.fp8": False,
                                               "optimizations.fp8_text_encoder": False}))
    fp8_settings = load_settings(config_with({**base, "optimizations.fp8": True,
                                              **parse_overrides(args.set)}))
    if random_weights:
        print(RANDOM_WARNING, flush=True)
    reference, _ = generate(bf16_settings, device, args.size, args.steps)
    images, report = generate(fp8_settings, device, args.size, args.steps)
    score, lpips_note = lpips_scorer()
    rows = []
    for prompt, seed, got, want in zip(PROMPTS, SEEDS, images, reference):
        row = {"prompt": prompt, "seed": seed, "psnr_db": round(psnr(got, want), 2),
               "ssim": round(ssim(got, want), 4)}
        if score is not None:
            row["lpips"] = round(score(got, want), 4)
        rows.append(row)
        print(f"seed {seed:3}  PSNR {row['psnr_db']:6.2f} dB  SSIM {row['ssim']:.4f}  "
              f"LPIPS {row.get('lpips', '-')}  {prompt[:50]}", flush=True)
    steps = {k: report[k] for k in ("fp8", "fp8_text_encoder")}
    result = verdict(rows, lpips_note, steps["fp8"]["status"])
    if lpips_note:
        print(lpips_note, flush=True)
    print("verdict:", result["result"], flush=True)
    if random_weights:
        print(RANDOM_WARNING, flush=True)
    write_json(args.out, {
        "system": "zimage engine in-process, eager: FP8 against bf16, same prompts and seeds",
        "weights": str(args.weights) if args.weights else f"random ({args.load_format})",
        "random_weights": random_weights,
        "warning": RANDOM_WARNING if random_weights else None,
        "size": args.size, "steps": args.steps, "fp8_steps": steps, "overrides": args.set,
        "lpips": lpips_note or "lpips (AlexNet)", "verdict": result, "rows": rows, **stamp()})


if __name__ == "__main__":
    main()
