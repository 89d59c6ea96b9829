"""Fuses the Z-Image transformer's parallel projections, and computes its rotary embedding in
real arithmetic.

Per block, diffusers runs q, k and v as three matrix products over the same input, and the
feed-forward's w1 and w3 as two. One product with the weights concatenated does the same
arithmetic in fewer, larger launches (each output column is computed as before). diffusers
applies RoPE through complex64 tensors, which torch.compile cannot fuse into the surrounding
kernels; written with cos and sin (rope.py) it fuses with the q/k norms. Weights are
concatenated in place, so the fused transformer holds no extra copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from . import qk_norm_rope
from .rope import apply_rotary


class FusedAttnProcessor:
    """ZSingleStreamAttnProcessor over one qkv product. The two class attributes are the ones
    diffusers' `set_attention_backend` sets on every processor."""

    _attention_backend = None
    _parallel_config = None
    # The backend for calls without a mask (diffusers passes none when every sequence of the
    # batch has one length: a single prompt without guidance); None: _attention_backend.
    unmasked_backend = None
    eager_attention = False  # set by set_eager_attention
    qk_kernel = None  # the qk_norm_rope operator, set by attach_qk_norm_rope

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 freqs_cis=None):
        qkv = attn.to_qkv(hidden_states)
        if self.qk_kernel is not None and freqs_cis is not None:
            # [3, batch, heads, seq, head_dim]: the layout the attention kernels read
            query, key, value = self.qk_kernel(
                qkv, attn.norm_qk_weight, torch.view_as_real(freqs_cis), attn.heads,
                attn.norm_q.eps).transpose(2, 3).unbind(0)
        else:
            query, key, value = qkv.unflatten(-1, (3, attn.heads, -1)).unbind(-3)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if freqs_cis is not None:
                query, key = apply_rotary(query, freqs_cis), apply_rotary(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        attend = _eager_dispatch if self.eager_attention else dispatch_attention_fn
        backend = self._attention_backend if attention_mask is not None or \
            self.unmasked_backend is None else self.unmasked_backend
        out = attend(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                     is_causal=False, backend=backend, parallel_config=self._parallel_config)
        return attn.to_out[0](out.flatten(2, 3).to(query.dtype))


@torch.compiler.disable
def _eager_dispatch(*args, **kwargs):
    """Attention outside torch.compile's graph: SDPA chooses its kernel at each call from the
    real tensors, not once when the graph is traced."""
    return dispatch_attention_fn(*args, **kwargs)


def fused_attentions(transformer: nn.Module) -> list[nn.Module]:
    """The attention modules of `transformer` that run a FusedAttnProcessor."""
    return [m for m in transformer.modules()
            if isinstance(getattr(m, "processor", None), FusedAttnProcessor)]


def attach_qk_norm_rope(transformer: nn.Module, device: torch.device) -> str | None:
    """Gives the fused blocks' attention the qk_norm_rope kernel after checking it on `device`
    at their own shape; returns why it cannot, or None when every fused block uses it. Runs
    wherever Triton does (the CPU only under TRITON_INTERPRET, which the tests use)."""
    attentions = fused_attentions(transformer)
    if not attentions:
        return "needs fuse_projections"
    op = qk_norm_rope.operator()
    if op is None:
        return "Triton is not installed"
    if any(attn.norm_q is None or attn.norm_k is None or attn.norm_q.eps != attn.norm_k.eps
           for attn in attentions):
        return "attention without q/k norms of one shape"
    shapes = {(attn.heads, attn.norm_q.weight.numel(), attn.norm_q.eps) for attn in attentions}
    if len(shapes) != 1:
        return "attention without q/k norms of one shape"
    [(heads, head_dim, eps)] = shapes
    if not qk_norm_rope.fits(heads, head_dim):
        return f"{heads} heads of {head_dim}: the kernel takes power-of-two heads of 16 to 256"
    dtype = attentions[0].norm_q.weight.dtype
    if (problem := qk_norm_rope.self_check(device, heads, head_dim, eps, dtype)) is not None:
        return f"self-check at {heads} heads of {head_dim} failed: {problem}"
    for attn in attentions:
        # One [2, head_dim] tensor for the kernel; a buffer, so it follows the module's device.
        attn.register_buffer("norm_qk_weight", torch.stack(
            (attn.norm_q.weight.detach(), attn.norm_k.weight.detach())), persistent=False)
        attn.processor.qk_kernel = op
    return None


def set_eager_attention(transformer: nn.Module, eager: bool) -> int:
    """Runs the fused blocks' attention outside (eager) or inside compiled code; returns how
    many processors it set."""
    attentions = fused_attentions(transformer)
    for attn in attentions:
        attn.processor.eager_attention = eager
    return len(attentions)


class FusedFeedForward(nn.Module):
    """SwiGLU with w1 and w3 as one product: w2(silu(x W1) * x W3)."""

    def __init__(self, w13: nn.Linear, w2: nn.Linear):
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(lin.out_features for lin in linears),
                      bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([lin.weight.data for lin in linears]),
                                requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.data for lin in linears]),
                                  requires_grad=False)
    return fused


def fuse_transformer(transformer: nn.Module) -> int:
    """Fuses every ZImageTransformerBlock of `transformer` in place; returns how many."""
    fused = 0
    for module in list(transformer.modules()):
        if type(module).__name__ != "ZImageTransformerBlock":
            continue
        attn = module.attention
        attn.to_qkv = _concat([attn.to_q, attn.to_k, attn.to_v])
        del attn.to_q, attn.to_k, attn.to_v
        attn.set_processor(FusedAttnProcessor())
        ff = module.feed_forward
        module.feed_forward = FusedFeedForward(_concat([ff.w1, ff.w3]), ff.w2)
        fused += 1
    return fused
