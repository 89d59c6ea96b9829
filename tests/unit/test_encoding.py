from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zimage_backend.encoding import encode_image


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
