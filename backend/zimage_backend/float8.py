"""FP8 matrix products: float8 e4m3 weights and activations with one scale per row, through
torch's `_scaled_mm` (Hopper's fp8 tensor cores), for the transformer and the text encoder.

This is torchao's "float8 dynamic activation, float8 weight, per-row" recipe written against
torch alone, because the GPU images we serve on ship no torchao. Weights are quantized once at
load; each activation row gets its own scale at run time, a reduction that torch.compile fuses
into the cast.

Which linear layers stay bf16 is config.yaml's choice (`optimizations.fp8_keep_bf16`,
`optimizations.fp8_text_encoder_keep_bf16`): shell-style patterns on the module names, each of
which must match a linear layer, so a typo fails at startup instead of silently turning a
sensitive layer to FP8.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
from torch import nn

from .settings import SettingsError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


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


def _matches(name: str, pattern: str) -> bool:
    """`pattern` matches the layer's own name or the name of a module holding it, so
    `layers.1[5-9]` keeps whole blocks and `*adaLN_modulation*` every modulation product."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern)
               for i in range(1, len(parts) + 1))


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which linear layers of one model become FP8 and which stay bf16, by module name."""

    fp8: tuple[str, ...]
    bf16: tuple[str, ...]
    # Kept whatever the patterns say: the model class's own `_skip_layerwise_casting_patterns`
    # (diffusers' ZImageTransformer2DModel: t_embedder, cap_embedder; its TimestepEmbedder
    # reads `mlp[0].weight.dtype`, which an FP8 layer does not have).
    forced: tuple[str, ...]

    def describe(self) -> str:
        forced = f", {len(self.forced)} of them by the model's own skip list" \
            if self.forced else ""
        return f"{len(self.fp8)} linear layers float8, {len(self.bf16)} kept bfloat16{forced}"


def select(model: nn.Module, keep_bf16: tuple[str, ...], setting: str) -> Selection:
    """Splits `model`'s linear layers by the patterns of `setting` (config.yaml's key, named
    in the error when a pattern matches no linear layer)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for pattern in keep_bf16:
        if not any(_matches(name, pattern) for name in names):
            example = next((n for n in names if ".0." in n), names[0] if names else "none")
            raise SettingsError(
                f"{setting}: pattern {pattern!r} matches no linear layer of the "
                f"{type(model).__name__} ({len(names)} linear layers, named like {example!r}); "
                "fix or remove it")
    skip = tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    forced = tuple(n for n in names if any(_matches(n, p) for p in skip))
    bf16 = tuple(n for n in names if n in forced or any(_matches(n, p) for p in keep_bf16))
    return Selection(fp8=tuple(n for n in names if n not in bf16), bf16=bf16, forced=forced)


def served_tokens(settings) -> int:
    """Rows of a block's products for one image of the default size: latent tokens (16x16
    pixels each) and a caption's 64."""
    return settings.defaults.height // 16 * (settings.defaults.width // 16) + 64


def check_products(model: nn.Module, names: tuple[str, ...], device: torch.device,
                   tokens: int, worst: float = 0.1) -> str | None:
    """Each distinct shape of the layers `names` of `model`: its FP8 product against the bf16
    one, on `device` at `tokens` rows of random input, with the model's own weights. Returns
    what went wrong, or None. e4m3 keeps 3 mantissa bits: about 3% relative error per product
    on random data, where a wrong product is off by about 140%."""
    shapes: dict[tuple[int, int], nn.Linear] = {}
    for name in names:
        linear = model.get_submodule(name)
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


def quantize(model: nn.Module, names: tuple[str, ...], device: torch.device | None = None) -> int:
    """Replaces the linear layers `names` of `model` by FP8 ones quantized on `device`;
    returns how many."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Float8Linear(getattr(parent, attr), device))
    return len(names)
