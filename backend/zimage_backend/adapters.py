"""The LoRA registry: config.yaml's `adapters:` loaded, checked and placed on the device.

Each adapter is read from safetensors only (never a pickle), from a local file or folder or a
pinned hub file, then brought to diffusers' key layout the way ZImagePipeline.lora_state_dict
does: kohya (`lora_unet_*`) and ComfyUI (`diffusion_model.*`) files, and any with `.alpha` keys,
go through diffusers' own `_convert_non_diffusers_z_image_lora_to_diffusers`. The Z-Image loader
is transformer-only, so text-encoder keys are refused rather than silently dropped. Any problem
fails startup with the adapter's name and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import torch

from .lora import Factors, LoraBank
from .settings import AdapterSettings, Settings

log = logging.getLogger(__name__)

# diffusers' default file name for a LoRA saved into a folder.
FOLDER_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig JSON in the safetensors header
_PREFIX = "transformer."
_TEXT_ENCODER = re.compile(r"^(text_encoders?[._]|lora_te\d*_|te\d?[._])")
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.")


class AdapterError(RuntimeError):
    """An adapter of the registry cannot be served; the message starts with its name."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter {name!r}: {reason}")
        self.name, self.reason = name, reason


@dataclasses.dataclass
class HostAdapter:
    """One adapter in diffusers' layout on the host, before it meets the transformer."""

    file: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B * alpha / r)


def locate(name: str, entry: AdapterSettings) -> Path:
    """The .safetensors file of an entry: the local file, the one in a local folder, or the
    pinned hub file (downloaded into the hub cache)."""
    if entry.from_hub:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(entry.source, entry.file, revision=entry.revision))
        except Exception as exc:  # noqa: BLE001 - any hub failure is this adapter's reason
            raise AdapterError(name, f"cannot download {entry.file} from {entry.source}"
                               f"@{entry.revision or 'main'}: {type(exc).__name__}: {exc}") from None
    path = Path(entry.source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        default = path / FOLDER_FILE
        if default.is_file():
            return default
        if len(files) != 1:
            raise AdapterError(name, f"folder {path} holds {len(files)} .safetensors files; "
                               f"name one, or call it {FOLDER_FILE}")
        return files[0]
    if not path.is_file():
        raise AdapterError(name, f"{path} does not exist")
    if path.suffix != ".safetensors":
        raise AdapterError(name, f"{path.name} is not a .safetensors file; only safetensors "
                           "is loaded (no pickle)")
    return path


def read(name: str, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise AdapterError(name, f"{file.name} is not a readable safetensors file: {exc}") from None


def to_diffusers(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' key layout (`transformer.<module>.lora_A.weight`), alphas folded in; as
    ZImageLoraLoaderMixin.lora_state_dict, with what it drops or warns about refused."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_z_image_lora_to_diffusers,
    )

    if not state:
        raise AdapterError(name, "the file holds no tensors")
    encoder = sorted(k for k in state if _TEXT_ENCODER.match(k))
    if encoder:
        raise AdapterError(name, f"holds text-encoder keys ({encoder[0]}, {len(encoder)} in "
                           "all); Z-Image LoRA is transformer-only, so they would be ignored")
    for marker, what in (("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"),
                         (".lokr_", "LoKr"), (".hada_", "LoHa")):
        if any(marker in k for k in state):
            raise AdapterError(name, f"is a {what} adapter; only LoRA is served")
    if any(k.endswith(".alpha") or k.startswith(("lora_unet_", "diffusion_model."))
           or "default." in k for k in state):
        try:
            state = _convert_non_diffusers_z_image_lora_to_diffusers(dict(state))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise AdapterError(name, f"diffusers cannot convert it: {exc}") from None
    foreign = sorted(k for k in state if not k.startswith(_PREFIX))
    if foreign:
        raise AdapterError(name, f"key {foreign[0]!r} is not a transformer LoRA key (diffusers "
                           "transformer.*, kohya lora_unet_*, ComfyUI diffusion_model.*)")
    return {k[len(_PREFIX):]: v for k, v in state.items()}


def _scales(name: str, modules: dict[str, int], metadata: dict[str, str]) -> dict[str, float]:
    """alpha / r per module as PEFT computes it. Without diffusers' LoraConfig metadata the
    alphas are already folded into the factors (scale 1), as diffusers loads such files."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return dict.fromkeys(modules, 1.0)
    try:
        config = {k.removeprefix(_PREFIX): v for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError) as exc:
        raise AdapterError(name, f"its {METADATA_KEY} header is not a JSON object: {exc}") from None
    if config.get("use_dora"):
        raise AdapterError(name, "is a DoRA adapter (use_dora in its config); only LoRA is served")
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    scales = {}
    for module, rank in modules.items():
        value = next((v for key, v in patterns.items()
                      if re.match(rf"(.*\.)?({key.removeprefix('^')})$", module)), alpha)
        value = rank if value is None else value
        scales[module] = value / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return scales


def load_host(name: str, entry: AdapterSettings) -> HostAdapter:
    """Reads and checks one adapter; raises AdapterError with the reason."""
    file = locate(name, entry)
    state, metadata = read(name, file)
    state = to_diffusers(name, state)
    modules, pairs = {}, {}
    for key in state:
        module, sep, kind = key.rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise AdapterError(name, f"key {key!r} is not a LoRA factor (lora_A.weight or "
                               "lora_B.weight)")
        pairs.setdefault(module, {})[kind[0]] = state[key]
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(name, f"{module} has lora_{''.join(pair)} without its partner")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(name, f"{module}: A {list(a.shape)} and B {list(b.shape)} are "
                               "not [rank, in] and [out, rank]")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(name, f"{module} holds NaN or infinite values")
        modules[module] = a.shape[0]
    scales = _scales(name, modules, metadata)
    factors = {m: (p["A"].float(), p["B"].float() * scales[m]) for m, p in pairs.items()}
    return HostAdapter(file, factors)


def summarize_modules(modules) -> str:
    """`attention.to_q, feed_forward.w1 (x34)`: module kinds and how many blocks, for the log."""
    kinds = Counter(_BLOCK.sub("", m) for m in modules)
    return ", ".join(f"{kind} (x{n})" if n > 1 else kind for kind, n in sorted(kinds.items()))


def install(transformer: torch.nn.Module, settings: Settings, device: torch.device,
            dtype: torch.dtype) -> LoraBank | None:
    """Loads every adapter of the registry and wraps the products they target; None (and
    nothing wrapped) when there are none. Logs one line per adapter."""
    registry, slots = settings.adapters, settings.limits.max_adapters_per_request
    if not registry:
        return None
    if slots < 1:
        log.warning("%d adapter(s) configured but limits.max_adapters_per_request is 0: none "
                    "loaded", len(registry))
        return None
    hosts = {name: load_host(name, entry) for name, entry in registry.items()}
    factors = {name: Factors({m: (a.to(device, dtype), b.to(device, dtype))
                              for m, (a, b) in host.factors.items()})
               for name, host in hosts.items()}
    # memory_constrained streams each weight from the host per layer (accelerate's hooks, per
    # tensor): a folded weight would sit on the device for good and lose its shared storage.
    fold = settings.optimizations.memory_mode != "memory_constrained"
    bank = LoraBank(transformer, factors, slots, device, dtype, fold)  # LoraTargetError names it
    for name, host in hosts.items():
        f = factors[name]
        log.info("adapter %s: rank %d, %d modules: %s; %.1f MiB on %s; from %s", name, f.rank,
                 len(f.by_module), summarize_modules(f.by_module), f.device_bytes / 2**20,
                 device, host.file)
    folded = sum(layer.folded for layer in bank.layers.values())
    log.info("adapters: %d wrapped products (%d folded into their base GEMM), %d slots of rank "
             "%d: %.1f MiB of slot buffers", len(bank.layers), folded, slots, bank.rank,
             bank.buffer_bytes / 2**20)
    return bank
