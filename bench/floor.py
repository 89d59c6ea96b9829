"""What this card's libraries allow: the matrix work of one image timed alone, kernel by kernel.

  python -m bench.floor --out results/raw/floor.json [--size 1024] [--caption-tokens 64]

Every product and attention of the transformer's forward, at the shapes one 1024x1024 image
gives it, runs alone on the GPU (cuBLAS for the products, SDPA's cuDNN and FlashAttention
kernels for attention). Their time times the steps is a lower bound for denoising in bf16 with
these kernels: no fusion of norms, RoPE or gating into them, no idle GPU. A 8192-cubed product
gives the card's practical bf16 peak for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import stamp, write_json
from zimage_backend.random_models import architecture_config


def gpu_ms(fn, iters: int = 30) -> float:
    """Median GPU time of one call, by CUDA events, after warming up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def matmul(m: int, k: int, n: int) -> tuple[float, float]:
    """(ms, TFLOP/s) of an (m x k) by (k x n) bf16 product laid out as nn.Linear's."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    ms = gpu_ms(lambda: F.linear(x, w))
    return ms, 2 * m * k * n / ms / 1e9


def attention(seq: int, heads: int, head_dim: int, backend: SDPBackend) -> tuple[float, float]:
    q, k, v = (torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    with sdpa_kernel([backend]):
        ms = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    return ms, 4 * seq * seq * heads * head_dim / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--caption-tokens", type=int, default=64,
                        help="caption length after the transformer's padding to 32")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True

    cfg = architecture_config("transformer")
    dim, heads = cfg["dim"], cfg["n_heads"]
    hidden = int(dim / 3 * 8)  # diffusers' ZImage FeedForward
    image_tokens = (args.size // 16) ** 2  # VAE /8, then 2x2 patches
    cap = args.caption_tokens
    # (name, tokens, number of such blocks per forward)
    blocks = [("main", image_tokens + cap, cfg["n_layers"]),
              ("noise_refiner", image_tokens, cfg["n_refiner_layers"]),
              ("context_refiner", cap, cfg["n_refiner_layers"])]
    # The products of one block, fused as the engine runs them (fuse_projections).
    products = [("qkv", dim, 3 * dim), ("out", dim, dim), ("w1w3", dim, 2 * hidden),
                ("w2", hidden, dim)]

    rows, gemm_ms, attn_ms = [], 0.0, {"cudnn": 0.0, "flash": 0.0}
    for block, tokens, count in blocks:
        for name, k, n in products:
            ms, tflops = matmul(tokens, k, n)
            gemm_ms += ms * count
            rows.append({"block": block, "op": name, "m": tokens, "k": k, "n": n,
                         "ms": round(ms, 4), "tflops": round(tflops, 1), "per_forward": count})
        for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("flash", SDPBackend.FLASH_ATTENTION)):
            ms, tflops = attention(tokens, heads, dim // heads, backend)
            attn_ms[label] += ms * count
            rows.append({"block": block, "op": f"attention ({label})", "seq": tokens,
                         "ms": round(ms, 4), "tflops": round(tflops, 1), "per_forward": count})
        print(rows[-6:], flush=True)
    _, peak = matmul(8192, 8192, 8192)
    steps = args.steps
    result = {
        "system": "matrix work of one image, each kernel alone", "size": args.size,
        "steps": steps, "caption_tokens": cap, "rows": rows,
        "peak_bf16_tflops_8192": round(peak, 1),
        "per_image_ms": {"gemm": round(gemm_ms * steps, 1),
                         "attention_cudnn": round(attn_ms["cudnn"] * steps, 1),
                         "attention_flash": round(attn_ms["flash"] * steps, 1),
                         "gemm_plus_best_attention": round(
                             (gemm_ms + min(attn_ms.values())) * steps, 1)},
        **stamp()}
    print(result["per_image_ms"], "peak", result["peak_bf16_tflops_8192"], flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
