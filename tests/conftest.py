"""Shared fixtures: the shipped config.yaml, and a tiny engine for in-process tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"


@pytest.fixture(scope="session")
def settings():
    from zimage_backend.settings import load_settings

    return load_settings(CONFIG)


@pytest.fixture(scope="session")
def tiny_settings(settings, tmp_path_factory):
    """The shipped settings with the demo pipeline in a fresh folder and a small warmup."""
    model = dataclasses.replace(settings.model, load_format="tiny",
                                demo_dir=str(tmp_path_factory.mktemp("tiny") / "pipeline"))
    warmup = dataclasses.replace(settings.optimizations.warmup, sizes=((64, 64),))
    return dataclasses.replace(settings, model=model, optimizations=dataclasses.replace(
        settings.optimizations, warmup=warmup))


@pytest.fixture(scope="session")
def engine(tiny_settings):
    import torch

    from zimage_backend.engine import Engine

    return Engine(tiny_settings, torch.device("cpu"))
