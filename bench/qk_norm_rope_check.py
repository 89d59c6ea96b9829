"""The qk_norm_rope kernel on a GPU: the start-up check at the served shape, the kernel against
its torch reference at a shape whose offsets pass 2**31 (12 images of 2048x2048, as raised
limits allow), and its time at the served 1024x1024 shape.

  python -m bench.qk_norm_rope_check --out bench/results/<run>/qk_norm_rope_check.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import stamp, write_json
from zimage_backend import qk_norm_rope


def inputs(batch: int, seq: int, heads: int, dim: int, seed: int):
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(seed)
    qkv = torch.randn((batch, seq, 3 * heads * dim), generator=gen, device=device,
                      dtype=torch.bfloat16)
    weight = (torch.rand((2, dim), generator=gen, device=device) + 0.5).to(torch.bfloat16)
    angles = torch.rand((batch, seq, dim // 2), generator=gen, device=device) * 6.3
    freqs = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    return qkv, weight, freqs, heads, 1e-6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import triton.testing

    op = qk_norm_rope.operator()
    result = {"self_check_served_shape": qk_norm_rope.self_check(
        torch.device("cuda"), 30, 128, 1e-6, torch.bfloat16) or "passed"}
    # 3 * 12 * 30 * 16896 * 128 = 2.34e9 elements: past 2**31.
    batch, seq = 12, 16896
    args_big = inputs(batch, seq, 30, 128, 1)
    got = op(*args_big)
    worst = None
    for b in range(batch):  # the reference a row at a time: float32 copies of all would not fit
        one = (args_big[0][b:b + 1], args_big[1], args_big[2][b:b + 1], 30, 1e-6)
        problem = qk_norm_rope.mismatch(got[:, b:b + 1], qk_norm_rope.reference(*one))
        worst = worst or problem
    result["large_shape"] = {"batch": batch, "seq": seq, "elements": got.numel(),
                             "past_2_31": got.numel() > 2**31, "check": worst or "passed"}
    del got, args_big
    served = inputs(1, 4160, 30, 128, 2)
    ms = triton.testing.do_bench(lambda: op(*served), warmup=50, rep=300, return_mode="median")
    moved = 2 * served[0].numel() * 2  # read q, k, v once and write them once, bf16
    result["served_shape"] = {"tokens": 4160, "us": round(ms * 1000, 1),
                              "tb_per_s": round(moved / (ms / 1000) / 1e12, 2),
                              "ms_per_image": round(ms * 34 * 8, 1)}
    result.update(stamp())
    print(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
