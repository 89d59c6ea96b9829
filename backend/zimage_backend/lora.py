"""LoRA adapters computed beside the transformer's products, switched without recompiling.

diffusers' hotswap replaces PEFT's weights in place, but PEFT layers follow neither this
project's fused q/k/v and w1/w3 products (fusion.py) nor its FP8 products (float8.py). So each
targeted product, whatever it is, is wrapped:

    y = base(x) + (x @ A^T) @ B^T

A is [slots * parts * rank, in] and B [out, slots * parts * rank]: one column block per slot
(limits.max_adapters_per_request) and per part of a fused product (q, k, v or w1, w3), each
padded with zeros to the registry's largest rank. B's block of a part covers only that part's
output rows, so a fused product's delta is exactly the three (or two) unfused deltas. A slot's
B holds its adapter's scale (alpha / rank and the request's scale) folded in.

Activating an adapter set copies the adapters' factors, resident on the device, into the slot
columns in place. No tensor is created or reshaped, so compiled graphs and their guards stay
valid: a switch costs device-to-device copies and no recompile. A slot no adapter uses has its
A rows zeroed, which makes its product zero whatever its B still holds.

An nn.Linear product whose output is wider than its input plus the slot columns (the fused
q/k/v and w1/w3 products, unfused w1 and w3) is folded: its weight W and B share one tensor
W_ext = [W | B] of [out, in + width], and one GEMM over K = in + width computes

    y = [x | x @ A^T] @ W_ext^T + bias

Per token, the delta GEMM with beta 1 reads and rewrites the whole output (2 * out values
besides the base GEMM's); the fold writes and reads the concatenation once more instead
(about 2 * (in + width), less when inductor writes x's producer straight into it). So the fold
pays where in + width < out and would cost more on w2 (out < in) and about as much on the
square products, which keep the delta GEMM. The FLOPs are the same either way. The base
module's `weight` stays a Parameter, a view of W_ext's first `in` columns (fusion, float8 and
everything reading `.weight` see the same values; none of them runs after the adapters), and
`lora_b` is a view of the rest, so the weight is stored once and activation still copies into
views in place. FP8 products keep the delta GEMM: their base GEMM is FP8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .float8 import Float8Linear

# The unfused names of each part of the products fusion.py builds, in their row order.
FUSED_PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "w13": ("w1", "w3")}
_FUSED_OF = {part: (fused, i) for fused, parts in FUSED_PARTS.items()
             for i, part in enumerate(parts)}


class LoraTargetError(ValueError):
    """An adapter names a module the transformer lacks, or factors of the wrong shape."""


class LoraLinear(nn.Module):
    """A product (nn.Linear, a fused Linear or Float8Linear) with slots of low-rank deltas."""

    def __init__(self, base: nn.Module, parts: int, slots: int, rank: int,
                 device: torch.device, dtype: torch.dtype, fold: bool = True):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.parts, self.slots, self.rank = parts, slots, rank
        width = slots * parts * rank
        self.register_buffer("lora_a", torch.zeros(width, self.in_features, device=device,
                                                   dtype=dtype), persistent=False)
        self.folded = (fold and isinstance(base, nn.Linear) and base.weight.dtype == dtype
                       and self.in_features + width < self.out_features)
        if self.folded:
            weight_ext = torch.zeros(self.out_features, self.in_features + width,
                                     device=device, dtype=dtype)
            with torch.no_grad():
                weight_ext[:, :self.in_features].copy_(base.weight)
            # Not persistent: the state dict keeps the base's own `weight` key (a view).
            self.register_buffer("weight_ext", weight_ext, persistent=False)
            self._view_weight_ext(base.weight.requires_grad)
        else:
            self.register_buffer("lora_b", torch.zeros(self.out_features, width, device=device,
                                                       dtype=dtype), persistent=False)

    def _view_weight_ext(self, requires_grad: bool) -> None:
        """The base weight and lora_b as views of weight_ext, which holds their storage."""
        self.base.weight = nn.Parameter(self.weight_ext[:, :self.in_features],
                                        requires_grad=requires_grad)
        self.register_buffer("lora_b", self.weight_ext[:, self.in_features:], persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to() converts every parameter and buffer alone, which would give the base
        # weight and lora_b storages of their own: convert weight_ext alone and view it again.
        if not self.folded:
            return super()._apply(fn, recurse)
        requires_grad = self.base.weight.requires_grad
        del self.base.weight, self.lora_b
        super()._apply(fn, recurse)
        self._view_weight_ext(requires_grad)
        return self

    @property
    def weight(self) -> torch.Tensor:
        # diffusers reads some products' weight for their dtype or device.
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, -2)
        low = F.linear(rows, self.lora_a)
        if self.folded:
            # 2-D, so that inductor writes `low` and x's producer straight into the
            # concatenation rather than copying them in.
            out = F.linear(torch.cat([rows, low], dim=-1), self.weight_ext, self.base.bias)
            return out.view(*x.shape[:-1], self.out_features)
        out = self.base(x)
        # The delta's product accumulates into the base output (GEMM with beta 1): no delta
        # tensor of the output's size is written and read back for a separate add.
        return torch.addmm(out.flatten(0, -2), low, self.lora_b.t()).view_as(out)

    def columns(self, slot: int, part: int) -> slice:
        start = (slot * self.parts + part) * self.rank
        return slice(start, start + self.rank)

    def rows(self, part: int) -> slice:
        size = self.out_features // self.parts
        return slice(part * size, (part + 1) * size)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where an unfused module name lands in the (maybe fused) transformer."""

    path: str  # the product's module path
    part: int
    parts: int


def resolve(transformer: nn.Module, name: str) -> Target:
    """The product that computes module `name` (diffusers' unfused name)."""
    module = _submodule(transformer, name)
    if _is_product(module):
        return Target(name, 0, 1)
    parent, _, leaf = name.rpartition(".")
    if leaf in _FUSED_OF:
        fused, part = _FUSED_OF[leaf]
        path = f"{parent}.{fused}" if parent else fused
        if _is_product(_submodule(transformer, path)):
            return Target(path, part, len(FUSED_PARTS[fused]))
    what = "is not a linear layer" if module is not None else "does not exist"
    raise LoraTargetError(f"targets {name!r}, which {what} in the transformer")


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_product(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Linear, Float8Linear, LoraLinear))


@dataclasses.dataclass
class Factors:
    """One adapter's low-rank factors per module, on the device: A [r, in], B [out, r] with
    alpha / r folded into B."""

    by_module: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.by_module.values())

    @property
    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.by_module.values()
                   for t in pair)


class LoraBank:
    """The wrapped products of one transformer and the adapters they can run."""

    def __init__(self, transformer: nn.Module, adapters: Mapping[str, Factors], slots: int,
                 device: torch.device, dtype: torch.dtype, fold: bool = True):
        if slots < 1 or not adapters:
            raise ValueError("a LoRA bank needs at least one slot and one adapter")
        self.slots, self.fold = slots, fold
        self.rank = max(f.rank for f in adapters.values())
        self.adapters = dict(adapters)
        self.targets: dict[str, dict[str, Target]] = {}
        for name, factors in adapters.items():
            try:
                self.targets[name] = {m: resolve(transformer, m) for m in factors.by_module}
            except LoraTargetError as exc:
                raise LoraTargetError(f"adapter {name!r}: {exc}") from None
        self.layers: dict[str, LoraLinear] = {}
        for targets in self.targets.values():
            for module, target in targets.items():
                self._check_shapes(transformer, module, target, adapters)
                if target.path not in self.layers:
                    self.layers[target.path] = self._wrap(transformer, target, device, dtype)
        self._slot_a = [[layer.lora_a[layer.columns(k, p)] for layer in self.layers.values()
                         for p in range(layer.parts)] for k in range(slots)]
        self._copies: dict[tuple[str, int], tuple[list, list, list, list]] = {}
        self.active: tuple[tuple[str, float], ...] = ()

    def _check_shapes(self, transformer, module: str, target: Target,
                      adapters: Mapping[str, Factors]) -> None:
        product = transformer.get_submodule(target.path)
        out = product.out_features // target.parts
        for name, factors in adapters.items():
            if module not in factors.by_module:
                continue
            a, b = factors.by_module[module]
            if a.shape[1] != product.in_features or b.shape[0] != out:
                raise LoraTargetError(
                    f"adapter {name!r}: {module} has A {list(a.shape)} and B {list(b.shape)}; "
                    f"the transformer's {module} takes {product.in_features} inputs and gives "
                    f"{out} outputs")

    def _wrap(self, transformer: nn.Module, target: Target, device, dtype) -> LoraLinear:
        parent_path, _, leaf = target.path.rpartition(".")
        parent = transformer.get_submodule(parent_path) if parent_path else transformer
        layer = LoraLinear(getattr(parent, leaf), target.parts, self.slots, self.rank, device,
                           dtype, self.fold)
        setattr(parent, leaf, layer)
        return layer

    @property
    def buffer_bytes(self) -> int:
        """Device memory of the slot buffers, shared by every adapter."""
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in (layer.lora_a, layer.lora_b))

    def _copy_lists(self, name: str, slot: int):
        """(A destinations, A sources, B destinations, B sources) of adapter `name` in `slot`."""
        key = (name, slot)
        if key not in self._copies:
            lists: tuple[list, list, list, list] = ([], [], [], [])
            for module, target in self.targets[name].items():
                a, b = self.adapters[name].by_module[module]
                layer = self.layers[target.path]
                cols = layer.columns(slot, target.part)
                cols = slice(cols.start, cols.start + a.shape[0])
                lists[0].append(layer.lora_a[cols])
                lists[1].append(a)
                lists[2].append(layer.lora_b[layer.rows(target.part), cols])
                lists[3].append(b)
            self._copies[key] = lists
        return self._copies[key]

    def activate(self, adapter_set: Sequence[tuple[str, float]]) -> None:
        """Makes the next forward passes run `adapter_set` ((name, scale) pairs, at most one per
        slot); in place, so compiled code sees the same tensors."""
        adapter_set = tuple(adapter_set)
        if adapter_set == self.active:
            return
        if len(adapter_set) > self.slots:
            raise ValueError(f"{len(adapter_set)} adapters for {self.slots} slots")
        with torch.no_grad():
            for slot in range(self.slots):
                torch._foreach_zero_(self._slot_a[slot])
            for slot, (name, scale) in enumerate(adapter_set):
                a_dst, a_src, b_dst, b_src = self._copy_lists(name, slot)
                torch._foreach_copy_(a_dst, a_src)
                torch._foreach_copy_(b_dst, b_src)
                torch._foreach_mul_(b_dst, float(scale))
        self.active = adapter_set

    def modules_of(self, name: str) -> Iterable[str]:
        return self.targets[name].keys()
