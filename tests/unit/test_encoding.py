from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zimage_backend.encoding import encode_image, encode_png


@pytest.fixture()
def pixels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_formats_decode_to_the_same_size(settings, pixels, fmt, pil_format):
    data = encode_image(pixels, fmt, settings.encoding)
    image = Image.open(io.BytesIO(data))
    assert image.format == pil_format
    assert image.size == (64, 48)


def test_png_is_lossless_and_carries_text(settings, pixels):
    data = encode_image(pixels, "png", settings.encoding, {"Weights": "random (tiny demo)"})
    image = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(image), pixels)
    assert image.text["Weights"] == "random (tiny demo)"


def test_raw_is_not_an_encoding(settings, pixels):
    with pytest.raises(ValueError, match="raw"):
        encode_image(pixels, "raw", settings.encoding)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_png_deflated_in_strips_decodes_losslessly(level, threads):
    # Large enough for several strips, with a height no strip count divides evenly.
    rng = np.random.default_rng(level * 10 + threads)
    pixels = rng.integers(0, 256, size=(517, 390, 3), dtype=np.uint8)
    pixels[:200] //= 16  # some compressible rows too
    data = encode_png(pixels, level, threads)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert np.array_equal(np.asarray(image), pixels)


def test_png_text_that_latin1_cannot_hold_survives():
    pixels = np.zeros((8, 8, 3), np.uint8)
    image = Image.open(io.BytesIO(encode_png(pixels, 1, 1, {"Prompt": "雪の中の狐"})))
    image.load()
    assert image.text["Prompt"] == "雪の中の狐"


def test_png_size_is_close_to_pillows_on_a_smooth_image():
    y, x = np.mgrid[0:512, 0:512]
    pixels = np.stack([x // 2, y // 2, (x + y) // 4], axis=-1).astype(np.uint8)
    ours = len(encode_png(pixels, 1, 4))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    assert ours < 1.25 * len(buffer.getvalue())
