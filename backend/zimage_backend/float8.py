"""FP8 matrix products for the transformer blocks: float8 e4m3 weights and activations with one
scale per row, through torch's `_scaled_mm` (Hopper's fp8 tensor cores).

This is torchao's "float8 dynamic activation, float8 weight, per-row" recipe written against
torch alone, because the GPU images we serve on ship no torchao. Weights are quantized once at
load; each activation row gets its own scale at run time, a reduction that torch.compile fuses
into the cast. The adaLN and embedding layers stay in bf16: their products have a handful of rows
and their precision matters more than their time.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_SKIP = ("adaLN_modulation",)  # one row per image: no time to win, precision to lose


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale so each row's largest magnitude maps to FP8's largest value."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.data)
        # _scaled_mm wants its second operand column-major: the transpose of a row-major weight.
        self.register_buffer("weight_t", weight.t(), persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x8, x_scale = quantize_rows(rows)
        out = torch._scaled_mm(x8, self.weight_t, scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def supported(device: torch.device) -> str | None:
    """None when `device` can run FP8 products, else why not."""
    if device.type != "cuda":
        return "needs CUDA; this instance runs on the CPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"needs compute capability 8.9 or newer (Ada, Hopper); this GPU has {major}.{minor}"
    return None


def quantize_transformer(transformer: nn.Module) -> int:
    """Replaces the Linear layers inside the transformer's blocks; returns how many."""
    targets = []
    for block_name, block in transformer.named_modules():
        if type(block).__name__ != "ZImageTransformerBlock":
            continue
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and not any(s in name for s in _SKIP):
                targets.append((block, name))
    for block, name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, attr, Float8Linear(getattr(parent, attr)))
    return len(targets)
