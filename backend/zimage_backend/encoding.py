"""Encodes generated pixels into the image format a request asked for."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from .settings import Encoding


def encode_image(pixels: np.ndarray, output_format: str, encoding: Encoding,
                 text: dict[str, str] | None = None) -> bytes:
    """PNG, JPEG or WebP bytes of an HxWx3 uint8 image. `text` goes into PNG text chunks, so a
    saved file still says which weights made it."""
    image = Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)
        image.save(buffer, format="PNG", compress_level=encoding.png_compress_level, pnginfo=info)
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=encoding.jpeg_quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=encoding.webp_quality)
    else:
        raise ValueError(f"cannot encode {output_format!r}")
    return buffer.getvalue()
