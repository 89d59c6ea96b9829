"""LoRA adapters on the tiny pipeline: every published format loads to the same factors, bad
files fail with the adapter's name and reason, the served image is diffusers' image (fused and
unfused), and switching adapters recompiles nothing."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.test_qk_norm_rope import in_triton_interpreter
from tests.unit.test_transformer_rewrites import _forward
from zimage_backend import adapters as registry
from zimage_backend import float8, fusion, random_adapters, random_models
from zimage_backend.engine import Engine
from zimage_backend.lora import Factors, LoraBank, LoraLinear, LoraTargetError
from zimage_backend.settings import AdapterSettings

RANK = 4
# Strong enough that an adapter visibly changes the tiny model's 64x64 image.
B_STD = 0.3


@pytest.fixture(scope="module")
def shapes():
    return random_adapters.module_shapes(random_models.build_tiny_pipeline(0).transformer)


@pytest.fixture(scope="module")
def files(shapes, tmp_path_factory):
    """Three adapters: `full` (every block module, kohya with alpha), `partial` (only q and v
    of the main layers, ComfyUI with alpha) and `plain` (diffusers, alpha in its header)."""
    folder = tmp_path_factory.mktemp("loras")
    partial = {m: s for m, s in shapes.items()
               if m.startswith("layers.") and m.endswith(("to_q", "to_v"))}
    return {
        "full": random_adapters.write(folder / "full.safetensors", random_adapters.factors(
            shapes, RANK, seed=1, b_std=B_STD), "kohya", alpha=2.0),
        "partial": random_adapters.write(folder / "partial.safetensors", random_adapters.factors(
            partial, 2, seed=2, b_std=B_STD), "comfyui", alpha=4.0),
        "plain": random_adapters.write(folder / "plain.safetensors", random_adapters.factors(
            shapes, RANK, seed=3, b_std=B_STD), "diffusers", alpha=8.0),
    }


def _entry(path: Path, scale: float = 1.0) -> AdapterSettings:
    return AdapterSettings(source=str(path), file=None, revision=None, scale=scale)


def _with_adapters(settings, files, **opts):
    return dataclasses.replace(
        settings, adapters={name: _entry(path) for name, path in files.items()},
        optimizations=dataclasses.replace(settings.optimizations, **opts))


@pytest.mark.parametrize("fmt", random_adapters.FORMATS)
def test_each_format_loads_to_the_factors_with_alpha_over_rank(shapes, tmp_path, fmt):
    pairs = random_adapters.factors(shapes, RANK, seed=5)
    path = random_adapters.write(tmp_path / f"{fmt}.safetensors", pairs, fmt, alpha=2.0)
    host = registry.load_host("x", _entry(path))
    assert sorted(host.factors) == sorted(shapes)
    for module, (a, b) in pairs.items():
        got_a, got_b = host.factors[module]
        # diffusers splits alpha / rank between A and B; the product is what counts.
        torch.testing.assert_close(got_b @ got_a, (b @ a) * 2.0 / RANK)


def test_text_encoder_keys_are_refused_with_the_reason(shapes, tmp_path):
    from safetensors.torch import save_file

    pairs = random_adapters.factors(dict(list(shapes.items())[:1]), RANK, seed=5)
    tensors = random_adapters.state_dict(pairs, "kohya")
    tensors["lora_te1_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(RANK, 32)
    save_file(tensors, str(tmp_path / "te.safetensors"))
    with pytest.raises(registry.AdapterError, match=r"adapter 'te': holds text-encoder keys "
                       r"\(lora_te1_layers_0_self_attn_q_proj.*transformer-only"):
        registry.load_host("te", _entry(tmp_path / "te.safetensors"))


@pytest.mark.parametrize("name, make, reason", [
    ("pickle", lambda d: torch.save({}, d / "x.bin") or d / "x.bin", "not a .safetensors file"),
    ("missing", lambda d: d / "none.safetensors", "does not exist"),
    ("garbage", lambda d: (d / "g.safetensors").write_bytes(b"\x00" * 64) and d / "g.safetensors",
     "not a readable safetensors file"),
    ("two", lambda d: [(d / f"{i}.safetensors").write_bytes(b"") for i in "ab"] and d,
     "holds 2 .safetensors files"),
])
def test_bad_sources_fail_with_name_and_reason(tmp_path, name, make, reason):
    with pytest.raises(registry.AdapterError, match=f"adapter '{name}': .*{reason}"):
        registry.load_host(name, _entry(make(tmp_path)))


def test_non_finite_factors_are_refused(shapes, tmp_path):
    pairs = random_adapters.factors(dict(list(shapes.items())[:1]), RANK, seed=5)
    next(iter(pairs.values()))[1][0, 0] = float("nan")
    path = random_adapters.write(tmp_path / "nan.safetensors", pairs, "diffusers")
    with pytest.raises(registry.AdapterError, match="adapter 'nan': .*NaN or infinite"):
        registry.load_host("nan", _entry(path))


def test_a_module_the_transformer_lacks_fails_startup_by_name(tiny_settings, tmp_path):
    pairs = random_adapters.factors({"layers.0.attention.to_z": (32, 32)}, RANK, seed=5)
    path = random_adapters.write(tmp_path / "z.safetensors", pairs, "diffusers")
    settings = dataclasses.replace(tiny_settings, adapters={"zed": _entry(path)})
    with pytest.raises(LoraTargetError, match="adapter 'zed': targets 'layers.0.attention.to_z'"):
        Engine(settings, torch.device("cpu"))


def test_wrong_shapes_fail_startup_by_name(tiny_settings, tmp_path):
    pairs = random_adapters.factors({"layers.0.attention.to_q": (32, 48)}, RANK, seed=5)
    path = random_adapters.write(tmp_path / "w.safetensors", pairs, "diffusers")
    settings = dataclasses.replace(tiny_settings, adapters={"wide": _entry(path)})
    with pytest.raises(LoraTargetError, match="adapter 'wide': layers.0.attention.to_q has A "
                       r"\[4, 48\].*takes 32 inputs"):
        Engine(settings, torch.device("cpu"))


def _diffusers_image(settings, files, names, weights, prompt, seed, size, steps):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(settings.model.demo_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in names:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if names:
        pipe.set_adapters(list(names), list(weights))
    image = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "unfused"])
def lora_engine(request, tiny_settings, files):
    settings = _with_adapters(tiny_settings, files, fuse_projections=request.param)
    return Engine(settings, torch.device("cpu"))


CASES = [
    ((), ()),
    (("full",), (1.0,)),
    (("partial", "plain"), (0.7, -1.3)),
]


@pytest.mark.parametrize("names, weights", CASES, ids=["none", "one", "two-mixed"])
def test_the_image_is_diffusers_image(lora_engine, tiny_settings, files, engine, names, weights):
    request = dataclasses.replace(lora_engine._request("a red fox in the snow", 64, 2), seed=11,
                                  loras=tuple(zip(names, weights)))
    got = lora_engine.run([request]).pixels[0]
    want = _diffusers_image(tiny_settings, files, names, weights, request.prompt, 11, 64, 2)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    today = engine.run([dataclasses.replace(request, loras=())]).pixels[0]
    if names:
        # Not a vacuous match: the adapters change the image well past rounding.
        assert np.abs(got.astype(int) - today.astype(int)).mean() > 5
    else:
        assert np.array_equal(got, today)


def test_unconfigured_server_wraps_nothing(engine):
    assert engine.lora is None
    assert not any(isinstance(m, LoraLinear) for m in engine.pipe.transformer.modules())


def test_fused_products_are_wrapped_once_per_product(lora_engine):
    layers = lora_engine.lora.layers
    fused = lora_engine.settings.optimizations.fuse_projections
    assert ("layers.0.attention.to_qkv" in layers) == fused
    assert ("layers.0.attention.to_q" in layers) != fused
    qkv = layers["layers.0.attention.to_qkv" if fused else "layers.0.attention.to_q"]
    slots = lora_engine.settings.limits.max_adapters_per_request
    assert qkv.lora_a.shape == (slots * (3 if fused else 1) * RANK, 32)


def test_switching_adapters_recompiles_nothing(tiny_settings, files):
    from torch._dynamo.testing import CompileCounterWithBackend

    settings = _with_adapters(tiny_settings, files)
    eager = Engine(settings, torch.device("cpu"))
    compiled = Engine(settings, torch.device("cpu"))
    counter = CompileCounterWithBackend("inductor")
    torch._dynamo.reset()
    compiled.pipe.transformer.compile_repeated_blocks(backend=counter, dynamic=None)
    base = compiled._request("a lighthouse", 64, 2)
    sets = [(("full", 1.0),), (("partial", 0.5), ("plain", 1.0)), (), (("plain", -2.0),),
            (("full", 1.0),)]
    compiled.run([dataclasses.replace(base, loras=sets[0])])
    frames = counter.frame_count
    assert frames > 0
    for adapter_set in sets[1:]:
        request = dataclasses.replace(base, loras=adapter_set)
        got = compiled.run([request]).pixels[0].astype(int)
        # The compiled code reads the slots at run time: each switch draws the set's image.
        assert np.abs(got - eager.run([request]).pixels[0].astype(int)).max() <= 1
    assert counter.frame_count == frames, "a switch recompiled"


def _merged(transformer, pairs, scale):
    """The reference: each adapter's delta merged into a copy of the unfused weights."""
    merged = copy.deepcopy(transformer)
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            merged.get_submodule(module).weight += scale * (b @ a)
    return merged


def _banked(transformer, pairs, scale, rewrite=None):
    """A fused copy, rewritten by `rewrite`, with the adapter in slot 0 of a LoraBank."""
    fused = copy.deepcopy(transformer)
    fusion.fuse_transformer(fused)
    if rewrite is not None:
        rewrite(fused)
    bank = LoraBank(fused, {"a": Factors(pairs)}, 2, torch.device("cpu"), torch.float32)
    bank.activate((("a", scale),))
    return fused, bank


def test_unmerged_slots_equal_merged_weights_on_the_fused_transformer():
    transformer = random_models.build_tiny_pipeline(3).transformer
    pairs = random_adapters.factors(random_adapters.module_shapes(transformer), RANK, seed=9,
                                    b_std=B_STD)
    expected = _forward(_merged(transformer, pairs, 0.7), 0)
    fused, bank = _banked(transformer, pairs, 0.7)
    assert torch.allclose(_forward(fused, 0), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_forward(transformer, 0), expected, rtol=1e-2, atol=1e-3)
    bank.activate(())
    assert torch.equal(_forward(fused, 0), _forward(_banked(transformer, pairs, 0.0)[0], 0))


def _all_fp8(transformer):
    float8.quantize(transformer, float8.select(transformer, (), "keep_bf16").fp8)


def test_slots_sit_beside_fp8_products():
    transformer = random_models.build_tiny_pipeline(3).transformer
    shapes = random_adapters.module_shapes(transformer)
    pairs = random_adapters.factors(shapes, RANK, seed=9, b_std=B_STD)
    fused, _ = _banked(transformer, pairs, 1.5, rewrite=_all_fp8)
    qkv = fused.layers[0].attention.to_qkv
    assert isinstance(qkv, LoraLinear) and isinstance(qkv.base, float8.Float8Linear)
    assert not qkv.folded  # its base GEMM is FP8: the delta GEMM accumulates into it
    x = torch.randn(2, 7, qkv.in_features)
    with torch.no_grad():
        torch.testing.assert_close(qkv(x), qkv.base(x) + _qkv_delta([pairs], x, [1.5]))


def _stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return sum(storages.values())


def _qkv_delta(pairs, x, scales):
    """The unfused q/k/v deltas of layer 0 for adapters `pairs` at `scales`, concatenated."""
    names = ("to_q", "to_k", "to_v")
    return sum(scale * torch.cat([x @ p[f"layers.0.attention.{n}"][0].T
                                  @ p[f"layers.0.attention.{n}"][1].T for n in names], dim=-1)
               for p, scale in zip(pairs, scales))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_folded_product_is_base_plus_delta_with_the_weight_stored_once(dtype, tol):
    transformer = random_models.build_tiny_pipeline(3).transformer.to(dtype)
    shapes = random_adapters.module_shapes(transformer)
    fusion.fuse_transformer(transformer)
    pairs = [{m: (a.to(dtype), b.to(dtype)) for m, (a, b) in
              random_adapters.factors(shapes, RANK, seed=s, b_std=B_STD).items()} for s in (9, 10)]
    qkv = transformer.layers[0].attention.to_qkv
    base_weight = qkv.weight.detach().clone()
    before = _stored_bytes(transformer)
    bank = LoraBank(transformer, {"a": Factors(pairs[0]), "b": Factors(pairs[1])}, 2,
                    torch.device("cpu"), dtype)
    layer = bank.layers["layers.0.attention.to_qkv"]
    assert layer.folded and layer is transformer.layers[0].attention.to_qkv
    # One tensor holds the weight and B: the base weight and lora_b are views of it.
    storage = layer.weight_ext.untyped_storage()
    for view in (layer.base.weight, layer.lora_b):
        assert view.untyped_storage().data_ptr() == storage.data_ptr()
    assert isinstance(layer.base.weight, torch.nn.Parameter)
    assert torch.equal(layer.base.weight, base_weight)
    assert _stored_bytes(transformer) - before == bank.buffer_bytes  # A and B, nothing else

    bank.activate((("a", 0.7), ("b", -1.3)))
    x = torch.randn(2, 7, layer.in_features, dtype=dtype)
    with torch.no_grad():
        want = x.double() @ base_weight.double().T + _qkv_delta(
            [{m: (a.double(), b.double()) for m, (a, b) in p.items()} for p in pairs],
            x.double(), (0.7, -1.3))
        got = layer(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)

    # Moving the module keeps one storage (Module.to converts each tensor alone).
    transformer.to(torch.float64)
    assert layer.base.weight.untyped_storage().data_ptr() == \
        layer.lora_b.untyped_storage().data_ptr() == layer.weight_ext.untyped_storage().data_ptr()
    assert layer.base.weight.dtype == torch.float64


def test_folded_and_unfolded_products_agree_and_memory_constrained_does_not_fold(tiny_settings,
                                                                                files):
    transformer = random_models.build_tiny_pipeline(3).transformer
    fusion.fuse_transformer(transformer)
    unfolded = copy.deepcopy(transformer)
    constrained = _with_adapters(tiny_settings, files, memory_mode="memory_constrained")
    folded_bank = registry.install(transformer, _with_adapters(tiny_settings, files),
                                   torch.device("cpu"), torch.float32)
    unfolded_bank = registry.install(unfolded, constrained, torch.device("cpu"), torch.float32)
    folded = {path for path, layer in folded_bank.layers.items() if layer.folded}
    # Folded where the output is wider than the input and the slot columns (q/k/v and w1/w3);
    # to_out and w2 keep the delta GEMM, which moves less memory there.
    assert "layers.0.attention.to_qkv" in folded and "layers.0.feed_forward.w13" in folded
    assert "layers.0.attention.to_out.0" not in folded
    assert "layers.0.feed_forward.w2" not in folded
    assert not any(layer.folded for layer in unfolded_bank.layers.values())
    for bank in (folded_bank, unfolded_bank):
        bank.activate((("partial", 0.5), ("full", 1.2)))
    torch.testing.assert_close(_forward(transformer, 0), _forward(unfolded, 0), rtol=1e-4,
                               atol=1e-5)


_QK_CHILD = textwrap.dedent("""
    import torch
    from zimage_backend import fusion, random_adapters, random_models
    from tests.unit.test_lora import _banked, _merged, RANK, B_STD
    from tests.unit.test_transformer_rewrites import _forward

    transformer = random_models.build_tiny_pipeline(3).transformer
    pairs = random_adapters.factors(random_adapters.module_shapes(transformer), RANK, seed=9,
                                    b_std=B_STD)
    expected = _forward(_merged(transformer, pairs, 0.7), 0)
    kernel = lambda t: fusion.attach_qk_norm_rope(t, torch.device("cpu"))
    fused, _ = _banked(transformer, pairs, 0.7, rewrite=kernel)
    assert fused.layers[0].attention.processor.qk_kernel is not None
    got = _forward(fused, 0)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    print("lora with kernel ok")
""")


def test_slots_feed_the_qk_norm_rope_kernel_in_triton_interpreter():
    result = in_triton_interpreter(_QK_CHILD)
    assert result.returncode == 0 and "lora with kernel ok" in result.stdout, \
        result.stderr[-3000:]


def test_a_hub_adapter_that_cannot_download_fails_with_name_and_reason(monkeypatch, tmp_path):
    # No hub here: offline, the download fails the way an unreachable hub does.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    entry = AdapterSettings(source="someone/z-image-ink", file="ink.safetensors",
                            revision="0123abc", scale=1.0)
    with pytest.raises(registry.AdapterError, match=r"adapter 'ink': cannot download "
                       r"ink.safetensors from someone/z-image-ink@0123abc: "):
        registry.load_host("ink", entry)
