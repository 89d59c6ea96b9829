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
    def __init__(self, linear: nn.Linear, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Quantized where it will run: a transformer still on the host is rewritten before
        # it is placed, and quantizing 6B weights there would take the CPU tens of seconds.
        weight, scale = quantize_rows(linear.weight.data.to(device or linear.weight.device))
        # _scaled_mm wants its second operand column-major: the transpose of a row-major weight.
        self.register_buffer("weight_t", weight.t(), persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.data.to(weight.device), requires_grad=False)

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


def _targets(transformer: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every Linear inside the blocks that FP8 replaces."""
    targets = []
    for block in transformer.modules():
        if type(block).__name__ != "ZImageTransformerBlock":
            continue
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and not any(s in name for s in _SKIP):
                parent_name, _, attr = name.rpartition(".")
                targets.append((block.get_submodule(parent_name) if parent_name else block,
                                attr, module))
    return targets


def served_tokens(settings) -> int:
    """Rows of a block's products for one image of the default size: latent tokens (16x16
    pixels each) and a caption's 64."""
    return settings.defaults.height // 16 * (settings.defaults.width // 16) + 64


def check_products(transformer: nn.Module, device: torch.device, tokens: int,
                   worst: float = 0.1) -> str | None:
    """Each distinct shape of the layers FP8 replaces: its FP8 product against the bf16 one, on
    `device` at `tokens` rows of random input, with the model's own weights. Returns what went
    wrong, or None. e4m3 keeps 3 mantissa bits: about 3% relative error per product on random
    data, where a wrong product is off by about 140%."""
    shapes: dict[tuple[int, int], nn.Linear] = {}
    for _, _, linear in _targets(transformer):
        shapes.setdefault((linear.in_features, linear.out_features), linear)
    generator = torch.Generator(device).manual_seed(0)
    for (features, outputs), linear in shapes.items():
        reference = nn.Linear(features, outputs, bias=linear.bias is not None, device=device,
                              dtype=linear.weight.dtype)
        reference.weight.data.copy_(linear.weight.data)
        if linear.bias is not None:
            reference.bias.data.copy_(linear.bias.data)
        x = torch.randn((tokens, features), generator=generator, device=device).to(
            linear.weight.dtype)
        try:
            with torch.no_grad():
                got, want = Float8Linear(reference, device)(x).float(), reference(x).float()
        except Exception as exc:  # noqa: BLE001 - a product that cannot run is not served
            return f"{features}x{outputs}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        error = ((got - want).norm() / want.norm()).item()
        if not error < worst:  # also NaN
            return (f"{features}x{outputs}: relative error {error:.3g} against bf16, more than "
                    f"{worst}")
    return None


def quantize_transformer(transformer: nn.Module, device: torch.device | None = None) -> int:
    """Replaces the Linear layers inside the transformer's blocks, quantized on `device`;
    returns how many."""
    targets = _targets(transformer)
    for parent, attr, linear in targets:
        setattr(parent, attr, Float8Linear(linear, device))
    return len(targets)
