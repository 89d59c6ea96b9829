"""The optimization steps: their declared order, and one requirement and one check per switch,
each with its own reason in the report."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zimage_backend import float8, fusion, optimizations
from zimage_backend.random_models import build_tiny_pipeline

from .test_transformer_rewrites import _context, _inputs, _steps


@pytest.fixture()
def fresh_pipe():
    return build_tiny_pipeline(seed=3)


def _with_opts(settings, **changes):
    return dataclasses.replace(settings, optimizations=dataclasses.replace(
        settings.optimizations, **changes))


def test_module_rewrites_meet_real_weights_before_placement(fresh_pipe, tiny_settings,
                                                           monkeypatch):
    """Placement may leave offload hooks and meta placeholders; the rewrites must already be
    done by then, whatever the memory mode."""
    seen = {}
    place = next(s for s in optimizations.STEPS if s.switch == "memory_mode")

    def spy(ctx):
        block = ctx.pipe.transformer.layers[0]
        seen["fused"] = hasattr(block.attention, "to_qkv")
        seen["meta"] = any(p.is_meta for p in ctx.pipe.transformer.parameters())
        return place.apply(ctx)

    steps = tuple(dataclasses.replace(s, apply=spy) if s is place else s
                  for s in optimizations.STEPS if s.switch != "torch_compile")
    optimizations.optimize(_context(fresh_pipe, tiny_settings), steps)
    assert seen == {"fused": True, "meta": False}
    names = [s.switch for s in optimizations.STEPS]
    assert names.index("memory_mode") > max(names.index(n) for n in
                                            ("fuse_projections", "qk_norm_rope", "fp8",
                                             "fp8_text_encoder"))
    # Compilation last, then the steps that give compiled modules a second variant.
    assert names[-3:] == ["torch_compile", "static_shapes", "transformer_cuda_graphs"]


def test_every_switch_has_one_outcome(engine):
    switches = [o.switch for o in engine.report.outcomes]
    assert switches == [s.switch for s in optimizations.STEPS]


def test_fp8_refuses_a_model_dtype_other_than_bfloat16(fresh_pipe, tiny_settings, monkeypatch):
    monkeypatch.setattr(float8, "supported", lambda device: None)  # as on a Hopper GPU
    ctx = optimizations.optimize(_context(fresh_pipe, _with_opts(tiny_settings, fp8=True)),
                                 _steps("fp8"))
    outcome = ctx.report.as_dict()["fp8"]
    assert outcome["status"] == "skipped"
    assert outcome["detail"] == ("needs model.dtype bfloat16 (the per-row scaled products "
                                 "write bfloat16); the transformer is float32")


def test_fp8_checks_its_products_against_bfloat16(fresh_pipe, tiny_settings):
    transformer = fresh_pipe.transformer.to(torch.bfloat16)
    fusion.fuse_transformer(transformer)
    names = float8.select(transformer, (), "keep").fp8
    assert float8.check_products(transformer, names, torch.device("cpu"), 80) is None


def test_a_wrong_fp8_product_is_a_fallback_with_its_reason(fresh_pipe, tiny_settings,
                                                          monkeypatch):
    monkeypatch.setattr(float8, "supported", lambda device: None)
    fresh_pipe.transformer.to(torch.bfloat16)
    real = float8.quantize_rows
    # A scale off by two: every product twice what it should be.
    monkeypatch.setattr(float8, "quantize_rows", lambda x: (lambda q, s: (q, s * 2))(*real(x)))
    settings = _with_opts(tiny_settings, fp8=True, fp8_keep_bf16=("*adaLN_modulation*",))
    ctx = optimizations.optimize(_context(fresh_pipe, settings), _steps("fp8"))
    outcome = ctx.report.as_dict()["fp8"]
    assert outcome["status"] == "fallback"
    assert "relative error" in outcome["detail"] and "against bf16" in outcome["detail"]
    assert not any(isinstance(m, float8.Float8Linear) for m in fresh_pipe.transformer.modules())


def test_an_attention_backend_that_fails_its_check_is_named(fresh_pipe, tiny_settings,
                                                            monkeypatch):
    real = optimizations.attention_check

    def check(transformer, device, backend, masked):
        if backend == "_native_efficient":
            raise RuntimeError("refuses this mask")
        real(transformer, device, backend, masked)

    monkeypatch.setattr(optimizations, "attention_check", check)
    settings = _with_opts(tiny_settings, attention_backends=("_native_efficient", "native"))
    ctx = optimizations.optimize(_context(fresh_pipe, settings), _steps("attention_backend"))
    outcome = ctx.report.as_dict()["attention_backend"]
    assert outcome["status"] == "fallback" and ctx.attention_backend == "native"
    assert "_native_efficient: RuntimeError: refuses this mask" in outcome["detail"]


def test_the_attention_check_catches_a_wrong_kernel(fresh_pipe, monkeypatch):
    import zimage_backend.optimizations as module

    real = module.dispatch_attention_fn

    def wrong(q, k, v, attn_mask=None, backend=None):
        out = real(q, k, v, attn_mask=attn_mask, backend=backend)
        return out if backend == "_native_math" else out.flip(1)

    monkeypatch.setattr(module, "dispatch_attention_fn", wrong)
    with pytest.raises(RuntimeError, match="differs from the math kernel"):
        optimizations.attention_check(fresh_pipe.transformer, torch.device("cpu"), "native",
                                      masked=True)


def test_unmasked_calls_can_have_their_own_backend(fresh_pipe, tiny_settings, monkeypatch):
    settings = _with_opts(tiny_settings, unmasked_attention_backends=("_native_math",))
    ctx = optimizations.optimize(_context(fresh_pipe, settings), _steps(
        "fuse_projections", "attention_backend", "unmasked_attention_backend"))
    assert ctx.report.status("unmasked_attention_backend") == "applied"
    used = []
    real = fusion.dispatch_attention_fn

    def spy(*args, backend=None, attn_mask=None, **kwargs):
        used.append((str(getattr(backend, "value", backend)), attn_mask is None))
        return real(*args, backend=backend, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(fusion, "dispatch_attention_fn", spy)
    latents, t, captions = _inputs(0)
    transformer, dim = fresh_pipe.transformer, fresh_pipe.transformer.config.cap_feat_dim
    captions = [c[:, :1].expand(-1, dim).contiguous() for c in captions]
    with torch.inference_mode():
        transformer(latents[:1], t[:1], captions[:1], return_dict=False)  # one prompt: no mask
        unmasked, used[:] = set(used), []
        transformer(latents, t, captions, return_dict=False)  # unequal captions: a mask
    assert unmasked == {("_native_math", True)}
    # The caption blocks see the mask; the image-only refiner blocks still have none.
    assert set(used) == {("native", False), ("_native_math", True)}


def test_a_failed_compiled_run_falls_back_to_eager_code(fresh_pipe, tiny_settings):
    def fails(ctx):
        raise RuntimeError("InductorError: triton compile failed")

    ctx = _context(fresh_pipe, tiny_settings, run_once=fails)
    with pytest.raises(optimizations.CheckFailed, match="the first compiled run failed, "
                                                        "serving eager code: RuntimeError"):
        optimizations._compile(ctx)
    compiled = [m for _, m in optimizations._compiled_modules(ctx)]
    assert compiled and all(m._compiled_call_impl is None for m in compiled)
    assert ctx.graphed == frozenset()


@pytest.mark.parametrize("with_adapters", [False, True], ids=["no-adapters", "adapters"])
def test_the_compile_check_is_the_engines_own_run(tiny_settings, with_adapters, monkeypatch,
                                                  tmp_path):
    """The compiled first run goes through Engine.run before the engine holds the steps'
    results: it must see what the earlier steps left. When it read the adapter bank from the
    engine, every GPU server served eager code ('Engine' object has no attribute 'lora')."""
    from zimage_backend import random_adapters
    from zimage_backend.engine import Engine
    from zimage_backend.settings import AdapterSettings

    # The check's run is under test, not inductor: compiling does nothing here.
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: None)
    steps = tuple(dataclasses.replace(s, requirement=optimizations._always)
                  if s.switch == "torch_compile" else s for s in optimizations.STEPS)
    optimize = optimizations.optimize
    monkeypatch.setattr(optimizations, "optimize", lambda ctx: optimize(ctx, steps))
    settings = tiny_settings
    if with_adapters:
        shapes = random_adapters.module_shapes(build_tiny_pipeline(0).transformer)
        path = random_adapters.write(tmp_path / "a.safetensors",
                                     random_adapters.factors(shapes, 2, seed=1), "diffusers")
        settings = dataclasses.replace(settings, adapters={
            "a": AdapterSettings(source=str(path), file=None, revision=None, scale=1.0)})
    engine = Engine(settings, torch.device("cpu"))
    outcome = engine.report.as_dict()["torch_compile"]
    assert outcome["status"] == "applied", outcome["detail"]
    assert (engine.lora is not None) == with_adapters
