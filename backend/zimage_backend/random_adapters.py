"""LoRA files with random factors, real key names and real shapes, in each format Z-Image LoRAs
are published in: for the tests and the benchmarks, which cannot download real ones.

- diffusers / PEFT: `transformer.<module>.lora_A.weight` and `.lora_B.weight`, optionally with
  diffusers' LoraConfig (lora_alpha, r) in the safetensors header;
- kohya (sd-scripts, musubi): `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`
  and `.alpha`;
- ComfyUI: `diffusion_model.<module>.lora_A.weight`, `.lora_B.weight` and `.alpha`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

FORMATS = ("diffusers", "kohya", "comfyui")
# What Z-Image LoRA trainers target in every transformer block.
BLOCK_MODULES = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.(.+)$")


def module_shapes(transformer: nn.Module,
                  kinds: Iterable[str] = BLOCK_MODULES) -> dict[str, tuple[int, int]]:
    """(out, in) of every unfused Linear of the blocks whose in-block name is in `kinds`."""
    kinds = set(kinds)
    shapes = {}
    for name, module in transformer.named_modules():
        match = _BLOCK.match(name)
        if isinstance(module, nn.Linear) and match and match.group(2) in kinds:
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def factors(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int,
            b_std: float = 0.05) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A [rank, in], B [out, rank]) per module; B is not zero as a fresh LoRA's is, so
    the adapter changes the image."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module, (rows, cols) in shapes.items():
        a = torch.randn(rank, cols, generator=generator) / cols ** 0.5
        b = torch.randn(rows, rank, generator=generator) * b_std
        out[module] = (a, b)
    return out


def state_dict(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], fmt: str,
               alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in format `fmt`; `alpha` (kohya, ComfyUI) scales each module
    by alpha / rank, as those trainers do."""
    tensors = {}
    for module, (a, b) in pairs.items():
        if fmt == "diffusers":
            tensors[f"transformer.{module}.lora_A.weight"] = a
            tensors[f"transformer.{module}.lora_B.weight"] = b
            continue
        if fmt == "kohya":
            base = "lora_unet_" + module.replace(".", "_")
            down, up = f"{base}.lora_down.weight", f"{base}.lora_up.weight"
        elif fmt == "comfyui":
            base = f"diffusion_model.{module}"
            down, up = f"{base}.lora_A.weight", f"{base}.lora_B.weight"
        else:
            raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
        tensors[down], tensors[up] = a, b
        if alpha is not None:
            tensors[f"{base}.alpha"] = torch.tensor(float(alpha))
    return {k: v.contiguous() for k, v in tensors.items()}


def write(path: str | Path, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], fmt: str,
          alpha: float | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Writes a LoRA safetensors file. For the diffusers format `alpha` goes into diffusers'
    LoraConfig header (lora_alpha, r), as diffusers' training scripts save it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in state_dict(
        pairs, fmt, None if fmt == "diffusers" else alpha).items()}
    metadata = None
    if fmt == "diffusers" and alpha is not None:
        rank = next(iter(pairs.values()))[0].shape[0]
        metadata = {"lora_adapter_metadata": json.dumps({
            "transformer.r": rank, "transformer.lora_alpha": alpha,
            "transformer.target_modules": sorted(pairs)})}
    save_file(tensors, str(path), metadata=metadata)
    return path
