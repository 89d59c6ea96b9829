"""Each image mode (issue 14) draws the image of diffusers' own pipeline of that task, from the
same saved tiny pipeline (and tiny ControlNet), prompt, input images and seed: image-to-image,
inpainting, ControlNet and ControlNet inpainting, alone, batched, and with a LoRA adapter on.
The requests go through parse_request from encoded files, as the server receives them."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from diffusers import (ZImageControlNetInpaintPipeline, ZImageControlNetModel,
                       ZImageControlNetPipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline,
                       ZImagePipeline)
from PIL import Image

from tests.unit.test_engine_vs_diffusers import assert_same_image
from tests.unit.test_lora import _entry, files, shapes  # noqa: F401 - fixtures
from zimage_backend import controlnets
from zimage_backend.engine import Engine
from zimage_backend.request import (CONTROLNET, CONTROLNET_INPAINT, IMAGE_TO_IMAGE, INPAINT,
                                    parse_request)
from zimage_backend.settings import ControlNetSettings

HEIGHT, WIDTH, STEPS = 64, 80, 4


@pytest.fixture(scope="module")
def image_settings(tiny_settings):
    return dataclasses.replace(tiny_settings, controlnet=ControlNetSettings("tiny", None, None))


@pytest.fixture(scope="module")
def image_engine(image_settings):
    return Engine(image_settings, torch.device("cpu"))


@pytest.fixture(scope="module")
def references(image_engine, image_settings):
    """Plain diffusers, nothing of ours: the saved folders, in float32, one pipeline per task."""
    base = ZImagePipeline.from_pretrained(image_settings.model.demo_dir, dtype=torch.float32)
    controlnet = ZImageControlNetModel.from_pretrained(controlnets.tiny_dir(image_settings),
                                                       torch_dtype=torch.float32)
    pipes = {IMAGE_TO_IMAGE: ZImageImg2ImgPipeline(**base.components),
             INPAINT: ZImageInpaintPipeline(**base.components),
             CONTROLNET: ZImageControlNetPipeline(**base.components, controlnet=controlnet),
             CONTROLNET_INPAINT: ZImageControlNetInpaintPipeline(**base.components,
                                                                 controlnet=controlnet)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(seed: int) -> np.ndarray:
    """Smooth random colours: an image the VAE encodes to something other than noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))


def mask() -> np.ndarray:
    out = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    out[16:48, 24:64] = 255
    return out


def decoded(data: bytes, mode: str = "RGB") -> Image.Image:
    return Image.open(io.BytesIO(data)).convert(mode)


def parsed(settings, seed: int, **files) -> list:
    rows = {"PROMPT": np.array([[b"a lighthouse on a cliff"]], dtype=np.object_),
            "SEED": np.array([[seed]], dtype=np.int64),
            "NUM_INFERENCE_STEPS": np.array([[STEPS]], dtype=np.int32)}
    if not files:  # text-to-image at the inputs' size
        rows |= {"HEIGHT": np.array([[HEIGHT]], dtype=np.int32),
                 "WIDTH": np.array([[WIDTH]], dtype=np.int32)}
    for name, value in files.items():
        rows[name] = np.array([[value]], dtype=np.float32 if name in ("STRENGTH", "CONTROL_SCALE")
                              else np.object_)
    return parse_request(rows, settings.defaults, settings.limits, controlnet=True)


def diffusers_pixels(pipe, seed: int, **inputs) -> np.ndarray:
    with torch.inference_mode():
        images = pipe(prompt="a lighthouse on a cliff", height=HEIGHT, width=WIDTH,
                      num_inference_steps=STEPS, guidance_scale=0.0,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                      **inputs).images
    return (images[0] * 255).round().astype(np.uint8)


def far_apart(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a.astype(int) - b.astype(int)).mean() > 1


IMAGE, MASK, CONTROL = png(photo(1)), png(mask()), png(photo(2))
CASES = {
    IMAGE_TO_IMAGE: ({"IMAGE_INPUT": IMAGE, "STRENGTH": 0.6},
                     lambda: {"image": decoded(IMAGE), "strength": np.float32(0.6).item()}),
    INPAINT: ({"IMAGE_INPUT": IMAGE, "MASK": MASK, "STRENGTH": 0.9},
              lambda: {"image": decoded(IMAGE), "mask_image": decoded(MASK, "L"),
                       "strength": np.float32(0.9).item()}),
    CONTROLNET: ({"CONTROL_IMAGE": CONTROL, "CONTROL_SCALE": 0.7},
                 lambda: {"control_image": decoded(CONTROL),
                          "controlnet_conditioning_scale": np.float32(0.7).item()}),
    CONTROLNET_INPAINT: ({"CONTROL_IMAGE": CONTROL, "IMAGE_INPUT": IMAGE, "MASK": MASK},
                         lambda: {"control_image": decoded(CONTROL), "image": decoded(IMAGE),
                                  "mask_image": decoded(MASK, "L"),
                                  "controlnet_conditioning_scale": 0.75}),
}


@pytest.mark.parametrize("mode", list(CASES))
@pytest.mark.parametrize("seed", [0, 77])
def test_each_mode_draws_diffusers_image(image_engine, image_settings, references, mode, seed):
    fields, inputs = CASES[mode]
    [request] = parsed(image_settings, seed, **fields)
    assert request.mode == mode
    result = image_engine.run([request])
    ours = result.pixels[0]
    assert_same_image(ours, diffusers_pixels(references[mode], seed, **inputs()))
    # Not a vacuous match: the same seed without the image inputs is another image.
    [plain] = parsed(image_settings, seed)
    assert far_apart(ours, image_engine.run([plain]).pixels[0])
    assert "vae_encode" in result.timings_ms
    assert ("control" in result.timings_ms) == (mode in (CONTROLNET, CONTROLNET_INPAINT))


def test_strength_and_control_scale_change_the_image(image_engine, image_settings):
    def pixels(**fields):
        return image_engine.run(parsed(image_settings, 5, **fields)).pixels[0]

    assert far_apart(pixels(IMAGE_INPUT=IMAGE, STRENGTH=0.5), pixels(IMAGE_INPUT=IMAGE,
                                                                     STRENGTH=1.0))
    assert far_apart(pixels(CONTROL_IMAGE=CONTROL, CONTROL_SCALE=0.0),
                     pixels(CONTROL_IMAGE=CONTROL, CONTROL_SCALE=2.0))


def test_strength_runs_the_steps_diffusers_runs(image_engine, image_settings):
    [request] = parsed(image_settings, 3, IMAGE_INPUT=IMAGE, STRENGTH=0.6)
    seen = []
    pipe = image_engine.pipes[IMAGE_TO_IMAGE]
    hook = pipe.transformer.register_forward_hook(lambda *_: seen.append(1))
    try:
        image_engine.run([request])
    finally:
        hook.remove()
    assert len(seen) == request.denoise_steps == STEPS - int(STEPS - STEPS * 0.6) == 3


def test_batched_rows_match_diffusers_one_by_one(image_engine, image_settings, references):
    images = [png(photo(10)), png(photo(11))]
    rows = [parsed(image_settings, seed, IMAGE_INPUT=data, STRENGTH=0.8)[0]
            for seed, data in ((4, images[0]), (9, images[1]))]
    assert rows[0].group_key == rows[1].group_key
    for got, seed, data in zip(image_engine.run(rows).pixels, (4, 9), images):
        want = diffusers_pixels(references[IMAGE_TO_IMAGE], seed, image=decoded(data),
                                strength=np.float32(0.8).item())
        assert_same_image(got, want)


def test_image_to_image_with_a_lora_adapter_is_diffusers_image(image_settings, files):  # noqa: F811
    settings = dataclasses.replace(image_settings, adapters={"full": _entry(files["full"])})
    engine = Engine(settings, torch.device("cpu"))
    [request] = parsed(settings, 21, IMAGE_INPUT=IMAGE, STRENGTH=0.8)
    request = dataclasses.replace(request, loras=(("full", 1.0),))
    got = engine.run([request]).pixels[0]
    base = ZImagePipeline.from_pretrained(settings.model.demo_dir, dtype=torch.float32)
    pipe = ZImageImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(files["full"]), adapter_name="full")
    pipe.set_adapters(["full"], [1.0])
    want = diffusers_pixels(pipe, 21, image=decoded(IMAGE), strength=np.float32(0.8).item())
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    without = engine.run([dataclasses.replace(request, loras=())]).pixels[0]
    assert far_apart(got, without)


def test_compiled_warmup_runs_the_modes_that_compile_again(image_engine, monkeypatch):
    """A compiled engine warms image-to-image (the VAE encoder) and ControlNet (the
    transformer with control hints) at every warmup size before ready, so no client's first
    request of a mode pays a compile."""
    ran = []
    run = image_engine.run
    monkeypatch.setattr(image_engine, "run", lambda requests, *a, **k: (
        ran.extend((r.mode, r.height, r.width) for r in requests), run(requests, *a, **k))[1])
    monkeypatch.setattr(image_engine.report, "outcomes", list(image_engine.report.outcomes))
    image_engine.report.add("torch_compile", "applied", "as on a GPU")
    image_engine._warmup()
    for height, width in image_engine.settings.optimizations.warmup.sizes:
        for mode in (IMAGE_TO_IMAGE, CONTROLNET):
            assert (mode, height, width) in ran


@pytest.fixture(scope="module")
def fp8_image_engine(image_settings):
    """The image engine with every transformer block product in FP8 (float8.py's per-row
    products, which run on the CPU too): the mode pipelines share that transformer."""
    from zimage_backend import float8

    engine = Engine(image_settings, torch.device("cpu"))
    transformer = engine.pipe.transformer
    assert float8.quantize(transformer, float8.select(transformer, (), "keep_bf16").fp8) > 0
    return engine


@pytest.mark.parametrize("mode", list(CASES))
def test_each_mode_runs_on_fp8_products(fp8_image_engine, image_engine, image_settings, mode):
    """FP8 composes with the image modes: every mode's image stays the unquantized engine's
    image up to FP8 rounding, and still follows its inputs."""
    from zimage_backend import float8

    assert any(isinstance(m, float8.Float8Linear)
               for m in fp8_image_engine.pipes[mode].transformer.modules())
    fields, _ = CASES[mode]
    [request] = parsed(image_settings, 9, **fields)
    ours = fp8_image_engine.run([request]).pixels[0].astype(int)
    reference = image_engine.run([request]).pixels[0].astype(int)
    [plain] = parsed(image_settings, 9)
    text_only = fp8_image_engine.run([plain]).pixels[0].astype(int)
    rounding, unlike = np.abs(ours - reference).mean(), np.abs(ours - text_only).mean()
    # Measured: 0.7 to 1.1 of 255 from the unquantized image, 25 to 41 from text-to-image.
    assert rounding <= 2.0 and unlike > 10 * rounding, (rounding, unlike)
