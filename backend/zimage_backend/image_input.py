"""Decodes the image inputs of a request (IMAGE_INPUT, MASK, CONTROL_IMAGE) with PIL, safely.

A request's bytes are hostile until proven otherwise: the byte length is checked before PIL
sees them, only the PNG, JPEG and WebP decoders are tried (by the format PIL reads from the
bytes, never a file name), and the pixel count is read from the header and checked before a
single pixel is decoded, so a small file that expands to gigabytes (a decompression bomb)
costs nothing. Every failure is an `ImageInputError` naming the field; request.py turns it into
INVALID_ARG. No Triton or torch imports.

What the pipelines get (README, "Image inputs"):
- the image: EXIF orientation applied, transparency composited onto white, RGB;
- the mask: its luminance (L), white = repaint; diffusers' mask processor binarizes it at 0.5;
- both resized to cover the target size and center-cropped to it (`fit`), with LANCZOS,
  diffusers' own resampling filter, so the pipeline's own resize is then a no-op.
"""

from __future__ import annotations

import io
import math
import warnings

from PIL import Image, ImageOps

from .settings import MAX_INPUT_PIXELS

FORMATS = ("PNG", "JPEG", "WEBP")
# PIL's own bomb check (a warning above this, an error above twice this) backs up ours, which
# uses config.yaml's limits.max_input_pixels and runs first.
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
_RESAMPLE = Image.Resampling.LANCZOS


class ImageInputError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.detail = field, message


def decode(field: str, data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """The decoded image of `data`, EXIF orientation applied, in its own mode (RGB, RGBA, L...)."""
    if not data:
        raise ImageInputError(field, "is empty; give a PNG, JPEG or WebP file")
    if len(data) > max_bytes:
        raise ImageInputError(field, f"is {len(data)} bytes; at most {max_bytes} are allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageInputError(field, f"is not a PNG, JPEG or WebP file ({len(data)} bytes "
                                     "that none of these decoders reads)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(field, f"declares more than {Image.MAX_IMAGE_PIXELS} pixels; at "
                                     f"most {max_pixels} are allowed") from None
    except Exception as exc:  # noqa: BLE001 - a hostile header can raise anything
        raise ImageInputError(field, f"is a corrupt file: its header could not be read "
                                     f"({type(exc).__name__})") from None
    if image.format not in FORMATS:  # formats= already restricts; this keeps the rule explicit
        raise ImageInputError(field, f"is {image.format}; allowed formats: {', '.join(FORMATS)}")
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ImageInputError(field, f"is {width}x{height} ({width * height} pixels); at most "
                                     f"{max_pixels} pixels are allowed")
    if getattr(image, "n_frames", 1) > 1:
        raise ImageInputError(field, f"is an animated {image.format} of {image.n_frames} "
                                     "frames; give a still image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated data raises many kinds
        raise ImageInputError(field, f"is a corrupt or truncated {image.format} file "
                                     f"({type(exc).__name__})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (the usual page background)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """The mask's luminance; its alpha channel, if any, is ignored."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA").convert("RGB")
    return image.convert("L")


def fit(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resized to cover height x width keeping its aspect, then center-cropped to it."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=_RESAMPLE, centering=(0.5, 0.5))


def size_from_input(width: int, height: int, min_size: int, max_size: int,
                    max_pixels: int) -> tuple[int, int]:
    """The generated size (height, width) for an input of width x height without HEIGHT/WIDTH:
    scaled down, aspect kept, until it fits max_size and max_pixels, then each side rounded
    down to a multiple of 16 and kept within [min_size, max_size]."""
    scale = min(1.0, max_size / width, max_size / height, math.sqrt(max_pixels / (width * height)))
    sides = []
    for side in (height * scale, width * scale):
        # A little slack so float error never rounds an exact multiple of 16 down by 16.
        sides.append(min(max_size, max(min_size, int(side + 1e-6) // 16 * 16)))
    out_h, out_w = sides
    while out_h * out_w > max_pixels:  # min_size clamping on one side can still overshoot
        if out_h >= out_w:
            out_h -= 16
        else:
            out_w -= 16
    return out_h, out_w
