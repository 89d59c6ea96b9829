"""Z-Image's rotary position embedding in real arithmetic.

diffusers applies it through complex64 tensors, which torch.compile cannot fuse into the
surrounding kernels; written with cos and sin it fuses with the q/k norms. The fused attention
(fusion.py) and the qk_norm_rope kernel's reference both use this one definition.
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; freqs_cis: complex [batch, seq, head_dim / 2].
    The complex product (a + ib)(c + id) of diffusers' version, in float32 as there."""
    freqs = torch.view_as_real(freqs_cis).unsqueeze(2)
    cos, sin = freqs[..., 0], freqs[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return out.flatten(-2).type_as(x)
