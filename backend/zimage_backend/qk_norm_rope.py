"""One Triton kernel for the q/k RMS norms and the rotary embedding of every attention block.

It reads q, k and v once from the fused qkv product, normalizes and rotates each head of q and
k, and writes all three in the [batch, heads, seq, head_dim] layout the attention kernels read,
where torch.compile made two reduction kernels of the same work (measured:
bench/results/2026-11-26-h100-c/results.md, bench/results/2026-12-01-h200/NOTES.md). The Triton
code is in qk_norm_rope_triton.py. It rounds where diffusers' eager code rounds (the norm's output to the weight's dtype
before the weight, the weighted output before the rotation), so it computes what that code does
up to the order of a float32 sum.

Triton is imported on first use: CPU instances never need it, and the tests run the kernel in
Triton's CPU interpreter.
"""

from __future__ import annotations

import functools

import torch

from .rope import apply_rotary

# Tokens per program and warps, tuned on an H100 at 4160 tokens, 30 heads of 128: fewer tokens
# per program were faster (bench/results/2026-11-26-h100-c/NOTES.md).
_BLOCK_S, _WARPS = 8, 2


def fits(heads: int, head_dim: int) -> bool:
    """Whether the kernel handles this attention shape (a head is one power-of-two tile)."""
    return heads >= 1 and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


@functools.cache
def _kernel():
    import triton

    from . import qk_norm_rope_triton

    return triton, qk_norm_rope_triton.qk_norm_rope_kernel, qk_norm_rope_triton.offsets


def launch(qkv: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor,
           heads: int, eps: float, launcher=None) -> None:
    """Fills out[3, batch, heads, seq, head_dim] (q, k, v) from qkv[batch, seq, 3 * heads *
    head_dim]. weight[2, head_dim] holds the q and k norm weights, freqs[batch, seq, head_dim / 2,
    2] the rotation's (cos, sin) in float32. `launcher` wraps the kernel for torch.compile."""
    triton, kernel, _ = _kernel()
    batch, seq, width = qkv.shape
    head_dim = width // (3 * heads)

    def grid(meta):
        return (triton.cdiv(seq, meta["BLOCK_S"]), heads, 3 * batch)

    (launcher(kernel) if launcher else kernel)[grid](
        qkv, qkv.stride(0), qkv.stride(1), weight, freqs, freqs.stride(0), freqs.stride(1), out,
        batch, seq, eps, HEADS=heads, HEAD_DIM=head_dim, BLOCK_S=_BLOCK_S, num_warps=_WARPS)


@functools.cache
def operator():
    """The kernel as a torch operator, qk_norm_rope(qkv, weight, freqs, heads, eps) -> [3, batch,
    heads, seq, head_dim], which torch.compile schedules inside its graphs; None without
    Triton."""
    try:
        _kernel()
    except ImportError:
        return None
    from torch.library import triton_op, wrap_triton

    @triton_op("zimage::qk_norm_rope", mutates_args={})
    def qk_norm_rope(qkv: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, heads: int,
                     eps: float) -> torch.Tensor:
        if qkv.stride(-1) != 1 or freqs.stride(-1) != 1 or freqs.stride(-2) != 2:
            raise ValueError("qk_norm_rope needs qkv and freqs contiguous in their last dims")
        batch, seq, width = qkv.shape
        out = qkv.new_empty((3, batch, heads, seq, width // (3 * heads)))
        launch(qkv, weight, freqs, out, heads, eps, launcher=wrap_triton)
        return out

    return qk_norm_rope


def reference(qkv: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, heads: int,
              eps: float) -> torch.Tensor:
    """What the kernel computes, in torch: diffusers' RMSNorm, then rope.apply_rotary."""
    query, key, value = qkv.unflatten(-1, (3, heads, -1)).unbind(-3)
    out = []
    for x, w in ((query, weight[0]), (key, weight[1])):
        x = (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype) * w
        out.append(apply_rotary(x, torch.view_as_complex(freqs)).transpose(1, 2))
    return torch.stack(out + [value.transpose(1, 2)])


def mismatch(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Kernel and reference round to a 16-bit dtype at the same points; a float32 sum in another
    order may move a result across a rounding boundary, so they may differ by one unit in the
    last place at a few elements, never more. In float32 nothing rounds but the sums: a few
    units in its last place."""
    ulps = 1 if want.dtype.itemsize == 2 else 64
    allowed = ulps * torch.finfo(want.dtype).eps * want.float().abs() + torch.finfo(want.dtype).tiny
    if not torch.isfinite(got).all():
        return "not finite"
    off = ((got.float() - want.float()).abs() > allowed).float().mean().item()
    if off > 1e-3:
        return f"{off:.2%} of the values differ by more than {ulps} unit(s) in the last place"
    return None


def self_check(device: torch.device, heads: int, head_dim: int, eps: float,
               dtype: torch.dtype, seq: int = 80) -> str | None:
    """Runs the operator once on random data at the model's attention shape against
    `reference`; returns what went wrong, or None."""
    generator = torch.Generator(device).manual_seed(0)
    qkv = torch.randn((2, seq, 3 * heads * head_dim), generator=generator, device=device)
    weight = torch.rand((2, head_dim), generator=generator, device=device) + 0.5
    angles = torch.rand((2, seq, head_dim // 2), generator=generator, device=device) * 6.3
    freqs = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
    args = (qkv.to(dtype), weight.to(dtype), freqs, heads, eps)
    try:
        got = operator()(*args)
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to build or run is not used
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return mismatch(got, reference(*args))
