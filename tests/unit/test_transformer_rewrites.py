"""The rewrites the engine makes for speed compute what diffusers computes: projection fusion,
real-valued RoPE, prompts padded to the longest instead of 512, and the FP8 products (within
FP8's precision)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch

from zimage_backend import float8, fusion, optimizations
from zimage_backend.engine import Engine
from zimage_backend.random_models import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=3)


def _inputs(seed: int):
    """Two latents and two captions of unequal length, so the attention mask is exercised."""
    gen = torch.Generator().manual_seed(seed)
    latents = [torch.randn(16, 1, 8, 8, generator=gen) for _ in range(2)]
    captions = [torch.randn(n, 16, generator=gen) for n in (5, 37)]
    return latents, torch.tensor([0.3, 0.7]), captions


def _context(pipe, settings, device="cpu", run_once=lambda ctx: None):
    return optimizations.Context(pipe=pipe, settings=settings, device=torch.device(device),
                                 report=optimizations.Report(), run_once=run_once)


def _steps(*switches: str) -> tuple[optimizations.Step, ...]:
    return tuple(s for s in optimizations.STEPS if s.switch in switches)


def _forward(transformer, seed: int) -> torch.Tensor:
    latents, t, captions = _inputs(seed)
    cap_dim = transformer.config.cap_feat_dim
    captions = [c[:, :1].expand(-1, cap_dim).contiguous() * torch.linspace(-1, 1, cap_dim)
                for c in captions]
    with torch.inference_mode():
        out = transformer(latents, t, captions, return_dict=False)[0]
    return torch.stack(out)


def test_fused_transformer_matches_diffusers(pipe):
    reference = pipe.transformer
    fused = copy.deepcopy(reference)
    blocks = fusion.fuse_transformer(fused)
    assert blocks == len(reference.layers) + len(reference.noise_refiner) + \
        len(reference.context_refiner)
    assert not hasattr(fused.layers[0].attention, "to_q")  # no second copy of the weights
    for seed in (0, 1):
        expected, got = _forward(reference, seed), _forward(fused, seed)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), \
            (got - expected).abs().max()


def test_attention_outside_the_graph_is_the_same_attention(pipe):
    fused = copy.deepcopy(pipe.transformer)
    blocks = fusion.fuse_transformer(fused)
    expected = _forward(fused, 0)
    assert fusion.set_eager_attention(fused, True) == blocks
    compiled = torch.compile(fused, backend="eager")  # traces through the disabled call
    assert torch.equal(_forward(compiled, 0), expected)
    assert fusion.set_eager_attention(pipe.transformer, True) == 0  # unfused: nothing to set


def test_rotary_matches_the_complex_product():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, 8, generator=gen, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(2, 9, 4), torch.randn(2, 9, 4, generator=gen))
    expected = torch.view_as_real(
        torch.view_as_complex(x.float().reshape(2, 9, 3, 4, 2)) * freqs.unsqueeze(2)
    ).flatten(3).to(torch.bfloat16)
    assert torch.equal(fusion.apply_rotary(x, freqs), expected)


@contextlib.contextmanager
def text_encoder_lengths(engine):
    """The sequence lengths the engine's text encoder is run on, while the block runs."""
    seen: list[int] = []
    hook = engine.pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def assert_padded_to_the_longest(engine, prompts, lengths) -> None:
    """Padded to the longest prompt (rounded up to a tile), far short of max_prompt_tokens."""
    longest = max(engine.count_tokens(p) for p in prompts)
    assert lengths and all(longest <= n < longest + 64 for n in lengths), (longest, lengths)


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_prompt_padding_does_not_change_the_embeddings(engine, padding):
    prompts = ["a fox", "a much longer prompt about a red fox in the snow at golden hour"]
    opts = dataclasses.replace(engine.settings.optimizations, prompt_padding=padding)
    other = copy.copy(engine)
    other.settings = dataclasses.replace(engine.settings, optimizations=opts)
    # A copy: diffusers writes the templated prompts back into the list it is given.
    reference = engine.pipe.encode_prompt(list(prompts), device=engine.device,
                                          do_classifier_free_guidance=False,
                                          max_sequence_length=engine.settings.limits
                                          .max_prompt_tokens)[0]
    with text_encoder_lengths(engine) as lengths, torch.inference_mode():
        ours = other.encode_prompts(prompts)
    if padding == "longest":
        assert_padded_to_the_longest(engine, prompts, lengths)
    else:
        assert set(lengths) == {engine.settings.limits.max_prompt_tokens}
    assert [e.shape for e in ours] == [e.shape for e in reference]
    for got, expected in zip(ours, reference):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_float8_linear_is_within_fp8_precision():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    linear.weight.data = torch.randn(128, 256, generator=gen)
    x = torch.randn(3, 11, 256, generator=gen)
    expected = linear(x)
    got = float8.Float8Linear(linear)(x)
    assert got.shape == expected.shape
    error = ((got - expected).norm() / expected.norm()).item()
    # e4m3 keeps 3 mantissa bits: ~3% per product, far from a wrong product (~141%).
    assert 0 < error < 0.06


def test_cpu_instance_reports_what_it_skipped(engine):
    report = engine.report.as_dict()
    assert report["fuse_projections"]["status"] == "applied"
    assert report["qk_norm_rope"] == {
        "status": "skipped", "detail": "needs CUDA; this instance runs on the CPU"}
    assert report["memory_mode"]["status"] == "applied"
    assert float8.supported(torch.device("cpu")) is not None


def test_unfused_engine_draws_the_same_image(engine, tiny_settings):
    opts = dataclasses.replace(tiny_settings.optimizations, fuse_projections=False,
                               prompt_padding="max_length")
    plain = Engine(dataclasses.replace(tiny_settings, optimizations=opts), torch.device("cpu"))
    request = plain._request("a red fox in the snow", 64, 2)
    a = plain.run([request]).pixels[0].astype(int)
    b = engine.run([request]).pixels[0].astype(int)
    assert abs(a - b).max() <= 1


def test_memory_mode_and_slicing_report_what_a_cpu_instance_does(tiny_settings):
    opts = dataclasses.replace(tiny_settings.optimizations, memory_mode="balanced",
                               attention_slicing=True, fp8=True,
                               warmup=dataclasses.replace(tiny_settings.optimizations.warmup,
                                                          enabled=False))
    engine = Engine(dataclasses.replace(tiny_settings, optimizations=opts), torch.device("cpu"))
    report = engine.report.as_dict()
    assert report["memory_mode"]["status"] == "skipped"
    assert report["vae_slicing"] == {"status": "applied",
                                     "detail": "memory_mode balanced turns it on"}
    # ZImagePipeline has nothing that slices attention: said, not silently ignored.
    assert report["attention_slicing"]["status"] == "skipped"
    assert report["fp8"]["status"] == "skipped" and "CUDA" in report["fp8"]["detail"]


def test_a_cudnn_mismatch_is_reported_not_fatal(pipe, tiny_settings, monkeypatch):
    """torch raises when it loaded a cuDNN other than its own (a system one first on
    LD_LIBRARY_PATH); the instance must still start and say so in its startup log."""
    def mismatch():
        raise RuntimeError("cuDNN version incompatibility: PyTorch was compiled against "
                           "(9, 19, 0) but found runtime version (9, 14, 0).\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", mismatch)
    ctx = optimizations.optimize(_context(pipe, tiny_settings), _steps("attention_backend"))
    detail = ctx.report.as_dict()["attention_backend"]["detail"]
    assert ctx.attention_backend == "native"
    assert "cuDNN mismatch: cuDNN version incompatibility" in detail and "more" not in detail


def test_frozen_pipeline_properties_say_what_diffusers_would(engine):
    """The engine fixes the execution device and the transformer's dtype instead of letting
    diffusers walk every module for them on each call; the classes keep their names."""
    from diffusers import ZImagePipeline
    from diffusers.models.modeling_utils import get_parameter_dtype

    assert isinstance(engine.pipe, ZImagePipeline)
    assert type(engine.pipe).__name__ == "ZImagePipeline"
    assert ZImagePipeline._execution_device.fget(engine.pipe) == engine.pipe._execution_device \
        == engine.device
    transformer = engine.pipe.transformer
    assert transformer.dtype == get_parameter_dtype(transformer)
    assert type(transformer).__name__ == "ZImageTransformer2DModel"


def test_noise_is_what_the_pipeline_would_draw(engine):
    """The engine draws the starting latents itself, before text encoding; they must be the ones
    ZImagePipeline.prepare_latents draws from the same seeds, so images do not change."""
    requests = [dataclasses.replace(engine._request("fox", 64, 2), seed=seed, width=96)
                for seed in (7, 8)]
    pipe = engine.pipe
    want = pipe.prepare_latents(2, pipe.transformer.in_channels, 64, 96, torch.float32,
                                torch.device("cpu"),
                                [torch.Generator("cpu").manual_seed(s) for s in (7, 8)])
    noise = engine._noise(requests)
    assert torch.equal(noise, want)
    # Each row is its own seed's: the same image alone or in a batch.
    assert torch.equal(noise[1:], engine._noise(requests[1:]))
