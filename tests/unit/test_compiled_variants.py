"""Two compiled variants of one module, picked per call: the transformer's CUDA graphs for small
images from a bounded pool, and static VAE code for the warmed shapes. CPU tests: the variants are
stand-ins that record which one ran; the GPU check of the real graphs is bench/graphs.py."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from zimage_backend import compiled_variants, optimizations
from zimage_backend.compiled_variants import GraphPool, StaticShapes

CPU = torch.device("cpu")
_OPTIMIZE = optimizations.optimize


def test_the_pool_serves_small_images_and_keeps_its_first_keys():
    pool = GraphPool(max_pixels=256 * 256, size=2, device=CPU)
    small, other, third = ((1, 256, 256, 64, "t"), (2, 128, 128, 64, "t"),
                           (1, 256, 256, 96, "t"))
    assert not pool.admits((1, 512, 512, 64, "t"))  # above max_pixels
    for key in (small, other):
        with pool.call(key) as on:
            assert on and pool.active
        assert not pool.active
    with pool.call(third) as on:  # the pool is full: no eviction, no graphs
        assert not on and not pool.active
    assert pool.admits(small) and set(pool.memory) == {small, other}


def test_a_failed_call_records_no_key():
    pool = GraphPool(max_pixels=1 << 20, size=4, device=CPU)
    with pytest.raises(RuntimeError), pool.call((1, 64, 64, 32, "t")):
        raise RuntimeError("out of memory")
    assert not pool.active and pool.memory == {}


def test_static_shapes_are_those_met_while_learning():
    shapes = StaticShapes()
    a, b = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 16, 16)
    assert shapes.choose((a,), {})
    shapes.learning = False
    assert shapes.choose((a,), {}) and not shapes.choose((b,), {})
    assert shapes.choose((), {"z": a})


def test_the_caption_bucket_is_the_transformers_padding():
    assert compiled_variants.caption_bucket([1]) == 32
    assert compiled_variants.caption_bucket([64, 65]) == 96


class Variants:
    """Stand-ins for the compiled variants: each runs the module's own call and counts it by the
    mode it was compiled with (torch.nn.Module.compile: 'plain')."""

    def __init__(self, monkeypatch, perturb_replay: bool = False):
        self.runs: Counter = Counter()
        variants = self

        def module_compile(module, *args, **kwargs):
            module._compiled_call_impl = variants.wrap(module._call_impl, "plain",
                                                       type(module).__name__)

        def torch_compile(fn, mode=None, dynamic=None, **kwargs):
            name = "replay" if mode == "reduce-overhead" else f"static={dynamic is False}"
            return variants.wrap(fn, name, type(fn.__self__).__name__)

        monkeypatch.setattr(torch.nn.Module, "compile", module_compile)
        monkeypatch.setattr(optimizations.torch, "compile", torch_compile)
        self.perturb_replay = perturb_replay

    def wrap(self, fn, variant, owner):
        def call(*args, **kwargs):
            self.runs[variant, owner] += 1
            out = fn(*args, **kwargs)
            if variant == "replay" and self.perturb_replay:
                out = out + 1.0  # a graph that read the wrong memory
            return out
        return call


def _engine(settings, monkeypatch, **compile_changes):
    from zimage_backend.engine import Engine

    steps = tuple(dataclasses.replace(s, requirement=optimizations._always)
                  if s.switch == "torch_compile" else s for s in optimizations.STEPS)
    monkeypatch.setattr(optimizations, "optimize", lambda ctx: _OPTIMIZE(ctx, steps))
    # Both second variants on, as a GPU user turns them on (the shipped config has them off).
    compile_changes = {"cuda_graphs": ("text_encoder", "transformer"),
                       "static_shapes": ("vae_decoder",), **compile_changes}
    tc = dataclasses.replace(settings.optimizations.torch_compile, **compile_changes)
    settings = dataclasses.replace(settings, optimizations=dataclasses.replace(
        settings.optimizations, torch_compile=tc))
    return Engine(settings, CPU)


def _request(engine, size):
    return dataclasses.replace(engine._request("a cat", size, 2), seed=1)


def test_small_images_replay_and_large_ones_run_the_compiled_code(tiny_settings, monkeypatch):
    variants = Variants(monkeypatch)
    engine = _engine(tiny_settings, monkeypatch, graph_max_pixels=64 * 64, graph_pool_size=4)
    outcome = engine.report.as_dict()["transformer_cuda_graphs"]
    assert outcome["status"] == "applied", outcome["detail"]
    assert "checked at 64x64: replay within 0 of 255" in outcome["detail"]
    block = "ZImageTransformerBlock"
    variants.runs.clear()
    small = engine.run([_request(engine, 64)])
    assert small.cuda_graphs and variants.runs["replay", block] > 0
    assert variants.runs["plain", block] == 0
    variants.runs.clear()
    large = engine.run([_request(engine, 128)])
    assert not large.cuda_graphs and variants.runs["replay", block] == 0
    assert variants.runs["plain", block] > 0
    # A batch of two is a key of its own.
    assert (1, 64, 64) in {key[:3] for key in engine.graph_pool.memory}
    engine.run([_request(engine, 64)] * 2)
    assert (2, 64, 64) in {key[:3] for key in engine.graph_pool.memory}


def test_replay_that_differs_from_the_compiled_code_is_not_served(tiny_settings, monkeypatch):
    variants = Variants(monkeypatch, perturb_replay=True)
    engine = _engine(tiny_settings, monkeypatch, graph_max_pixels=64 * 64)
    outcome = engine.report.as_dict()["transformer_cuda_graphs"]
    assert outcome["status"] == "fallback"
    assert "at 64x64 the replayed image differs from the compiled code's" in outcome["detail"]
    assert engine.graph_pool is None
    variants.runs.clear()
    result = engine.run([_request(engine, 64)])
    assert not result.cuda_graphs and variants.runs["replay", "ZImageTransformerBlock"] == 0


def test_the_vae_decoder_runs_static_code_for_warmed_shapes_only(tiny_settings, monkeypatch):
    variants = Variants(monkeypatch)
    engine = _engine(tiny_settings, monkeypatch, graph_max_pixels=0)
    assert engine.report.status("transformer_cuda_graphs") == "off"
    assert engine.report.status("static_shapes") == "applied"
    decoder = type(engine.pipe.vae.decoder).__name__
    variants.runs.clear()
    engine.run([_request(engine, 64)])  # the warmup's size
    assert variants.runs["static=True", decoder] == 1 and variants.runs["plain", decoder] == 0
    variants.runs.clear()
    engine.run([_request(engine, 96)])
    assert variants.runs["static=True", decoder] == 0 and variants.runs["plain", decoder] == 1


def test_graphs_need_the_transformer_compiled(tiny_settings, monkeypatch):
    Variants(monkeypatch)
    engine = _engine(tiny_settings, monkeypatch, modules=("vae_decoder",), static_shapes=())
    outcome = engine.report.as_dict()["transformer_cuda_graphs"]
    assert outcome == {"status": "skipped",
                       "detail": "needs transformer in optimizations.torch_compile.modules"}
    assert np.asarray(engine.run([_request(engine, 64)]).pixels).shape == (1, 64, 64, 3)


def test_the_engine_logs_where_its_start_went(tiny_settings, monkeypatch, caplog):
    import json
    import logging

    Variants(monkeypatch)
    with caplog.at_level(logging.INFO, logger="zimage_backend.engine"):
        _engine(tiny_settings, monkeypatch)
    [line] = [r.getMessage() for r in caplog.records if "startup phases" in r.getMessage()]
    phases = json.loads(line.split(": ", 1)[1])
    assert phases["load"] > 0 and phases["warmup"] > 0
    assert phases["steps"]["transformer_cuda_graphs"] > 0  # its check runs the engine thrice


def test_every_mode_with_adapters_composes_with_the_new_variants(tiny_settings, monkeypatch,
                                                                 tmp_path):
    """Transformer graphs, static VAE code and the text encoder stack on, with LoRA adapters and
    a ControlNet: every mode replays at a small size and draws the image of the same server
    with all three off."""
    from PIL import Image

    from zimage_backend import random_adapters
    from zimage_backend.random_models import build_tiny_pipeline
    from zimage_backend.settings import AdapterSettings, ControlNetSettings

    Variants(monkeypatch)
    shapes = random_adapters.module_shapes(build_tiny_pipeline(0).transformer)
    path = random_adapters.write(tmp_path / "a.safetensors",
                                 random_adapters.factors(shapes, 2, seed=1), "diffusers")
    settings = dataclasses.replace(
        tiny_settings, controlnet=ControlNetSettings("tiny", None, None),
        adapters={"a": AdapterSettings(source=str(path), file=None, revision=None, scale=1.0)})
    on = _engine(dataclasses.replace(settings, optimizations=dataclasses.replace(
        settings.optimizations, text_encoder_stack=True)), monkeypatch,
        graph_max_pixels=64 * 64)
    off = _engine(settings, monkeypatch, cuda_graphs=("text_encoder",), static_shapes=())
    for switch in ("transformer_cuda_graphs", "static_shapes", "text_encoder_stack"):
        assert on.report.status(switch) == "applied", on.report.as_dict()[switch]
    gray = Image.new("RGB", (64, 64), (120, 130, 140))
    mask = Image.new("L", (64, 64), 255)
    base = dataclasses.replace(_request(on, 64), loras=(("a", 0.8),))
    modes = {"text_to_image": {}, "image_to_image": {"image": gray, "strength": 0.6},
             "inpaint": {"image": gray, "mask": mask, "strength": 1.0},
             "controlnet": {"control_image": gray, "control_scale": 0.7},
             "controlnet_inpaint": {"image": gray, "mask": mask, "control_image": gray,
                                    "control_scale": 0.7}}
    for mode, fields in modes.items():
        request = dataclasses.replace(base, **fields)
        assert request.mode == mode
        served, plain = on.run([request]), off.run([request])
        assert served.cuda_graphs and not plain.cuda_graphs, mode
        assert all((a == b).all() for a, b in zip(served.pixels, plain.pixels)), mode
    assert {key[4] for key in on.graph_pool.memory} >= set(modes)
