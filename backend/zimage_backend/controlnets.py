"""Loads config.yaml's ControlNet (issue 14), or says that none is configured.

The model's own weights only: the parts it shares with the transformer (timestep and caption
embedders, noise and context refiners) are bound by diffusers' ZImageControlNetPipeline when
the engine builds it from the already-optimized transformer, so they run rewritten, quantized
and compiled like the rest of the transformer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import random_models
from .settings import Settings

log = logging.getLogger(__name__)


def tiny_dir(settings: Settings) -> Path:
    """Where load_format tiny writes its ControlNet: beside the tiny pipeline's folder."""
    demo = Path(settings.model.demo_dir).expanduser()
    return demo.with_name(demo.name + "-controlnet")


def load(settings: Settings, device: torch.device, dtype: torch.dtype):
    """The configured ControlNet on `device` in `dtype`, or None (load_format none)."""
    from diffusers import ZImageControlNetModel

    cfg = settings.controlnet
    if not cfg.enabled:
        log.info("controlnet: none configured; CONTROL_IMAGE is refused")
        return None
    seed = settings.model.seed_for_random_weights
    if cfg.load_format == "dummy":
        model = random_models.build_dummy_controlnet(device, dtype, seed)
        where = "random weights, ControlNet Union 2.1 shape"
    elif cfg.load_format == "tiny":
        folder = random_models.ensure_tiny_controlnet(tiny_dir(settings), seed)
        model = ZImageControlNetModel.from_pretrained(folder, torch_dtype=dtype)
        where = "random weights, tiny"
    else:
        source = Path(cfg.source).expanduser()
        if source.suffix == ".safetensors" and source.is_file():
            # The Union 2.0 / 2.1 releases are single files; diffusers tells them apart.
            model = ZImageControlNetModel.from_single_file(str(source), torch_dtype=dtype)
            where = f"single file {source.name}"
        else:
            model = ZImageControlNetModel.from_pretrained(cfg.source, revision=cfg.revision,
                                                          torch_dtype=dtype)
            where = f"pretrained ({source.name if source.exists() else cfg.source})"
    model = model.to(device).eval().requires_grad_(False)
    log.info("controlnet: loaded (%s, %s), %.2fB parameters of its own", cfg.load_format, where,
             sum(p.numel() for p in model.parameters()) / 1e9)
    return model
