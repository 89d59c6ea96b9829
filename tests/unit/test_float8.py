"""FP8 that a user can trust: which linear layers become FP8 is config.yaml's list of bf16
patterns, its default is vLLM-Omni's recipe, a pattern that matches nothing stops the start, and
the text encoder has its own switch and list."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from zimage_backend import float8, fusion, optimizations
from zimage_backend.random_models import architecture_config, build_tiny_pipeline
from zimage_backend.settings import SettingsError

from .test_transformer_rewrites import _context, _steps


@pytest.fixture()
def pipe(monkeypatch):
    monkeypatch.setattr(float8, "supported", lambda device: None)  # as on a Hopper GPU
    pipe = build_tiny_pipeline(seed=3)
    pipe.transformer.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    fusion.fuse_transformer(pipe.transformer)
    return pipe


def _opts(settings, **changes):
    return dataclasses.replace(settings, optimizations=dataclasses.replace(
        settings.optimizations, **changes))


def _kinds(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, float8.Float8Linear))}


def _on_meta(component: str):
    config = architecture_config(component)
    with torch.device("meta"):
        if component == "transformer":
            return ZImageTransformer2DModel(**config)
        return Qwen3Model(Qwen3Config(**config))


def test_a_pattern_keeps_the_layers_it_names_and_those_of_the_modules_it_names(pipe):
    selection = float8.select(pipe.transformer, ("*adaLN_modulation*", "layers.1"), "key")
    assert set(selection.bf16) >= {
        "layers.0.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0",
        "all_final_layer.2-1.adaLN_modulation.1", "layers.1.attention.to_qkv",
        "layers.1.attention.to_out.0", "layers.1.feed_forward.w13", "layers.1.feed_forward.w2"}
    assert set(selection.fp8) == {
        f"{block}.{layer}" for block in ("layers.0", "noise_refiner.0", "context_refiner.0")
        for layer in ("attention.to_qkv", "attention.to_out.0", "feed_forward.w13",
                      "feed_forward.w2")} | {"all_x_embedder.2-1", "all_final_layer.2-1.linear"}
    # diffusers' own skip list: TimestepEmbedder reads mlp[0].weight, which FP8 layers lack.
    assert set(selection.forced) == {"t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"}
    assert not set(selection.forced) & set(selection.fp8)


def test_the_default_recipe_on_the_real_architecture(settings):
    """The shipped lists on Z-Image-Turbo's own module names (30 main blocks, 36 text-encoder
    layers): vllm-omni #2795 and #3929."""
    opts = settings.optimizations
    transformer = float8.select(_on_meta("transformer"), opts.fp8_keep_bf16, "fp8_keep_bf16")
    blocks = {name.split(".")[0] + "." + name.split(".")[1] for name in transformer.fp8}
    assert blocks == {f"layers.{i}" for i in range(15)} | {
        "noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1"}
    assert not any("adaLN" in name or "embedder" in name or "final" in name
                   for name in transformer.fp8)
    assert len(transformer.fp8) == 19 * 7  # q, k, v, out, w1, w2, w3 of each FP8 block
    encoder = float8.select(_on_meta("text_encoder"), opts.fp8_text_encoder_keep_bf16,
                            "fp8_text_encoder_keep_bf16")
    assert {int(name.split(".")[1]) for name in encoder.bf16} == set(range(28, 36))
    assert {int(name.split(".")[1]) for name in encoder.fp8} == set(range(28))
    assert len(encoder.fp8) == 28 * 7 and not opts.fp8_text_encoder


def test_the_fp8_step_keeps_the_default_recipe_bf16(settings, monkeypatch):
    monkeypatch.setattr(float8, "supported", lambda device: None)
    pipe = build_tiny_pipeline(seed=3)
    # The tiny pipeline's transformer with the real model's 30 main and 2+2 refiner blocks.
    config = dict(pipe.transformer.config, n_layers=30, n_refiner_layers=2)
    pipe.transformer = ZImageTransformer2DModel(**{
        k: v for k, v in config.items() if not k.startswith("_")}).to(torch.bfloat16)
    fusion.fuse_transformer(pipe.transformer)
    ctx = optimizations.optimize(_context(pipe, _opts(settings, fp8=True)), _steps("fp8"))
    outcome = ctx.report.as_dict()["fp8"]
    assert outcome["status"] == "applied", outcome
    assert outcome["detail"].startswith(
        "76 linear layers float8, 98 kept bfloat16, 3 of them by the model's own skip list "
        "(optimizations.fp8_keep_bf16)")
    kinds = _kinds(pipe.transformer)
    for name, kind in kinds.items():
        block = name.split(".")
        kept = ("adaLN_modulation" in name or block[0] in (
            "t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer")
            or (block[0] == "layers" and int(block[1]) >= 15))
        assert kind == ("Linear" if kept else "Float8Linear"), name
    assert kinds["layers.14.feed_forward.w13"] == "Float8Linear"
    assert kinds["layers.15.feed_forward.w13"] == "Linear"


@pytest.mark.parametrize("key,pattern", [("fp8_keep_bf16", "layers.*.adaLN_modulaton"),
                                         ("fp8_text_encoder_keep_bf16", "lm_head")])
def test_a_pattern_that_matches_nothing_stops_the_start(pipe, tiny_settings, key, pattern):
    settings = _opts(tiny_settings, fp8=True, fp8_text_encoder=True,
                     fp8_keep_bf16=("*adaLN_modulation*",),
                     fp8_text_encoder_keep_bf16=("layers.1",))
    settings = _opts(settings, **{key: (*getattr(settings.optimizations, key), pattern)})
    with pytest.raises(SettingsError, match=rf"^optimizations\.{key}: pattern "
                                            rf"'{pattern.replace('*', '[*]')}' matches no linear"):
        optimizations.optimize(_context(pipe, settings), _steps("fp8", "fp8_text_encoder"))
    assert "Float8Linear" not in _kinds(pipe.text_encoder).values()
    if key == "fp8_keep_bf16":  # the transformer's step comes first
        assert "Float8Linear" not in _kinds(pipe.transformer).values()


def test_the_text_encoder_switch_converts_only_the_layers_allowed(pipe, tiny_settings):
    ids = torch.tensor([[5, 9, 13, 2, 7, 11, 3, 1]])
    with torch.no_grad():
        want = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    settings = _opts(tiny_settings, fp8_text_encoder=True,
                     fp8_text_encoder_keep_bf16=("layers.1",))
    ctx = optimizations.optimize(_context(pipe, settings), _steps("fp8", "fp8_text_encoder"))
    report = ctx.report.as_dict()
    assert report["fp8"]["status"] == "off"
    assert report["fp8_text_encoder"]["status"] == "applied", report
    assert report["fp8_text_encoder"]["detail"].startswith(
        "7 linear layers float8, 7 kept bfloat16 (optimizations.fp8_text_encoder_keep_bf16)")
    kinds = _kinds(pipe.text_encoder)
    assert {n for n, k in kinds.items() if k == "Float8Linear"} == {
        f"layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                  "mlp.down_proj")}
    assert isinstance(pipe.text_encoder.embed_tokens, torch.nn.Embedding)
    assert "Float8Linear" not in _kinds(pipe.transformer).values()
    with torch.no_grad():
        got = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert 0 < error < 0.1  # FP8 products, not bf16 ones, and not wrong ones


def test_a_wrong_text_encoder_product_is_a_fallback(pipe, tiny_settings, monkeypatch):
    real = float8.quantize_rows
    monkeypatch.setattr(float8, "quantize_rows", lambda x: (lambda q, s: (q, s * 2))(*real(x)))
    settings = _opts(tiny_settings, fp8_text_encoder=True, fp8_text_encoder_keep_bf16=())
    ctx = optimizations.optimize(_context(pipe, settings), _steps("fp8_text_encoder"))
    outcome = ctx.report.as_dict()["fp8_text_encoder"]
    assert outcome["status"] == "fallback" and "against bf16" in outcome["detail"]
    assert "Float8Linear" not in _kinds(pipe.text_encoder).values()


def test_the_text_encoder_needs_bfloat16_and_cuda(tiny_settings, monkeypatch):
    settings = _opts(tiny_settings, fp8_text_encoder=True)
    ctx = optimizations.optimize(_context(build_tiny_pipeline(seed=3), settings),
                                 _steps("fp8_text_encoder"))
    assert ctx.report.as_dict()["fp8_text_encoder"] == {
        "status": "skipped", "detail": "needs CUDA; this instance runs on the CPU"}
    monkeypatch.setattr(float8, "supported", lambda device: None)
    ctx = optimizations.optimize(_context(build_tiny_pipeline(seed=3), settings),
                                 _steps("fp8_text_encoder"))
    assert ctx.report.as_dict()["fp8_text_encoder"]["detail"].endswith(
        "the text encoder is float32")


def test_an_empty_pattern_is_a_settings_error(settings):
    with pytest.raises(SettingsError, match=r"optimizations.fp8_keep_bf16: ' ' is not a pattern"):
        _opts(settings, fp8_keep_bf16=(" ",)).validate()
