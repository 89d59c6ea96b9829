"""What load_pipeline hands the optimization steps, whatever the load format."""

from __future__ import annotations

import torch

CPU = torch.device("cpu")


def test_loaded_weights_are_frozen_like_built_ones(tiny_settings):
    """Parameters that require grad are another input to compiled code: the cache a dummy run
    wrote missed for the same weights loaded from a folder (bench/compile_cache.py)."""
    from zimage_backend.engine import load_pipeline

    pipe = load_pipeline(tiny_settings, CPU, torch.float32)
    modules = [p for p in pipe.components.values() if isinstance(p, torch.nn.Module)]
    assert modules and not any(p.requires_grad for m in modules for p in m.parameters())
    assert not any(m.training for m in modules)

