"""The text encoder as the engine runs it: its embeddings, then its decoder layers up to the one
whose output diffusers reads, as one module (issue 15, point 4).

diffusers takes `hidden_states[-2]` of the Qwen3 model: the output of the second-to-last layer.
Run through transformers' model forward, the last layer runs for nothing, and each layer is
three compiled graphs: transformers collects hidden states with forward hooks on the layers that
read a ContextVar, which dynamo cannot trace, so it breaks the graph at them. The stack calls the
layers' own `forward` (no hooks; forward-wrapping hooks such as offloading would still run), 35
of 36 layers, so compiled it is one graph per batch and caption length, and with the text
encoder's CUDA graphs one replay.

The attention mask is the one transformers builds for SDPA from a right-padded key mask: none for
a call without padding (SDPA's own causal mask), else causal and key padding combined.
"""

from __future__ import annotations

import torch
from torch import nn

# transformers (5.x) names the hook function it installs to collect outputs this way.
_CAPTURING_HOOK = "output_capturing_hook"


def decoder_model(encoder: nn.Module) -> nn.Module:
    """The module holding the decoder layers: the encoder itself (Qwen3Model), or its `.model`
    (a causal-LM wrapper)."""
    return encoder.model if hasattr(encoder, "model") else encoder


class TextStack(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        model = decoder_model(encoder)
        # The modules are shared with the text encoder, not copied.
        self.embed_tokens, self.rotary_emb = model.embed_tokens, model.rotary_emb
        self.layers = nn.ModuleList(list(model.layers)[:-1])

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """`key_mask`: [batch, length] bool, True for real tokens; None when all are real."""
        hidden = self.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        mask = None
        if key_mask is not None:
            length = input_ids.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & key_mask[:, None, None, :]
        for layer in self.layers:
            out = layer.forward(hidden, attention_mask=mask,
                                position_embeddings=position_embeddings,
                                position_ids=position_ids)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def drop_capturing_hooks(self, encoder: nn.Module) -> int:
        """Removes transformers' output-collecting hooks from the stack's modules, so compiled
        code meets no graph break; the encoder's own forward then no longer collects hidden
        states, so only the stack may run it. Returns how many were removed."""
        removed = 0
        for module in self.modules():
            for key, hook in list(module._forward_hooks.items()):
                if _CAPTURING_HOOK in getattr(hook, "__qualname__", ""):
                    del module._forward_hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_always_called.pop(key, None)
                    removed += 1
        # transformers installs them on the first forward that finds this unset.
        decoder_model(encoder)._output_capturing_hooks_installed = True
        return removed
