"""Engine.run draws the image that diffusers' own ZImagePipeline.__call__ draws from the same
saved tiny pipeline, prompt and seed: the engine's stages, rewrites and padding change how the
image is computed, never which image it is. Also when the checkpoint's tokenizer pads on the
left, which the engine must not inherit."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from transformers import AutoTokenizer

from zimage_backend.engine import Engine
from zimage_backend.request import GenerationRequest

from .test_transformer_rewrites import assert_padded_to_the_longest, text_encoder_lengths


@pytest.fixture(scope="module")
def tiny_dir(engine, tiny_settings) -> Path:
    """The folder the engine loaded (the engine fixture wrote it)."""
    return Path(tiny_settings.model.demo_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Plain diffusers, nothing of ours: from_pretrained of the same folder, in float32."""
    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pixels(pipe, request: GenerationRequest) -> np.ndarray:
    """The image as diffusers makes it, with the seed's generator on the CPU, as uint8 pixels
    rounded the way its PIL output rounds them."""
    with torch.inference_mode():
        images = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt,
                      height=request.height, width=request.width,
                      num_inference_steps=request.num_inference_steps,
                      guidance_scale=request.guidance_scale,
                      generator=torch.Generator("cpu").manual_seed(request.seed),
                      max_sequence_length=512, output_type="np").images
    return (images[0] * 255).round().astype(np.uint8)


def assert_same_image(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    # Fused projections and shorter padding round differently in the last float bit: at most
    # 1 of 255, at a few pixels. Another seed or prompt changes most pixels by tens.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def request(prompt: str, seed: int, **fields) -> GenerationRequest:
    values = dict(height=64, width=80, num_inference_steps=3, guidance_scale=0.0,
                  output_format="raw") | fields
    return GenerationRequest(prompt=prompt, seed=seed, **values)


@pytest.mark.parametrize("seed", [0, 1234])
def test_engine_draws_diffusers_image(engine, reference, seed):
    r = request("a lighthouse on a cliff at sunset", seed)
    assert_same_image(engine.run([r]).pixels[0], diffusers_pixels(reference, r))


def test_engine_draws_diffusers_image_with_guidance_and_a_negative_prompt(engine, reference):
    r = request("a red fox in the snow", 7, guidance_scale=4.0,
                negative_prompt="blurry, low quality, watermark")
    ours = engine.run([r]).pixels[0]
    assert_same_image(ours, diffusers_pixels(reference, r))
    # The negative prompt matters: without it the image is another one.
    plain = diffusers_pixels(reference, dataclasses.replace(r, negative_prompt=None))
    assert np.abs(ours.astype(int) - plain.astype(int)).mean() > 1


def test_batch_rows_match_diffusers_one_by_one(engine, reference):
    rows = [request("a cat", 3), request("a much longer prompt about a dog on a beach", 4)]
    for got, r in zip(engine.run(rows).pixels, rows):
        assert_same_image(got, diffusers_pixels(reference, r))


def test_a_tokenizer_saved_padding_left_gives_the_same_image(engine, tiny_dir, tiny_settings,
                                                             tmp_path):
    left_dir = tmp_path / "left"
    shutil.copytree(tiny_dir, left_dir)
    config = left_dir / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding_side": "left"}))
    assert AutoTokenizer.from_pretrained(left_dir / "tokenizer").padding_side == "left"
    model = dataclasses.replace(tiny_settings.model, load_format="auto", source=str(left_dir))
    left = Engine(dataclasses.replace(tiny_settings, model=model), torch.device("cpu"))
    # Two prompts of unequal length, so one of them is padded.
    rows = [request("a cat", 5), request("a lighthouse on a cliff at sunset, oil painting", 6)]
    with text_encoder_lengths(left) as lengths:
        pixels = left.run(rows).pixels
    for got, expected in zip(pixels, engine.run(rows).pixels):
        assert_same_image(got, expected)
    # RoPE is relative, so left padding would give the same embeddings; but only padding on
    # the right lets the engine pad to the longest prompt instead of to max_prompt_tokens.
    assert_padded_to_the_longest(left, [r.prompt for r in rows], lengths)
