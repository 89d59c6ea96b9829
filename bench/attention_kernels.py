"""Attention kernels at the served shape, with and without a mask: whether calls without a mask
(one prompt, no guidance) have a faster backend than the one masked calls need
(`optimizations.unmasked_attention_backends`).

Each backend is timed through diffusers' dispatch_attention_fn, the call the fused blocks make,
on 1024x1024's sequence (4096 image tokens and a 64-token caption), 30 heads of 128, bf16; and
checked against the math kernel in float32.

  python -m bench.attention_kernels --out bench/results/<run>/attention_kernels.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from bench.common import stamp, write_json

BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash",
            "_flash_3")
# Blocks that attend over the whole sequence for every step: 30 main layers and 2 noise
# refiners (the 2 context refiners see the caption alone).
BLOCKS, STEPS = 32, 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096 + 64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import triton.testing

    device, heads, dim, seq = torch.device("cuda"), 30, 128, args.tokens
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for masked in (False, True):
        batch = 2 if masked else 1
        q, k, v = (torch.randn((batch, seq, heads, dim), generator=gen, device=device,
                               dtype=torch.bfloat16) for _ in range(3))
        mask = None
        if masked:  # the second caption 40 tokens shorter
            mask = torch.ones((batch, 1, 1, seq), dtype=torch.bool, device=device)
            mask[1, ..., seq - 40:] = False
        want = dispatch_attention_fn(q.float(), k.float(), v.float(), attn_mask=mask,
                                     backend="_native_math")
        for backend in BACKENDS:
            row = {"backend": backend, "masked": masked, "batch": batch}
            try:
                got = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend)
                row["relative_l2"] = round(((got.float() - want).norm() / want.norm()).item(), 5)
                ms = triton.testing.do_bench(
                    lambda: dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend),
                    warmup=100, rep=500, return_mode="median")
                row["ms"] = round(ms, 4)
                row["ms_per_image"] = round(ms / batch * BLOCKS * STEPS, 1)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run is a row too
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            print(row, flush=True)
    write_json(args.out, {"what": f"attention, {seq} tokens, {heads} heads of {dim}, bf16; "
                                  f"ms_per_image: x {BLOCKS} blocks x {STEPS} steps",
                          "rows": rows, **stamp()})


if __name__ == "__main__":
    main()
