"""OpenAI's edit masks into the servers' masks.

OpenAI's ``mask`` is an image whose fully transparent pixels (alpha 0) mark where to edit; the
servers' MASK is white where to repaint. The gateway decodes only the mask (the image goes to
the servers as it came, and they decode it under their own limits), so this is the one place
where it decodes what a caller sent: a pixel limit before decoding, a fixed list of formats.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ApiError, invalid

__all__ = ["MASK_FORMATS", "MAX_MASK_PIXELS", "repaint_mask"]

# Formats that carry an alpha channel; OpenAI asks for a PNG.
MASK_FORMATS = ("PNG", "WEBP")
# The servers' limit on an image input (config.yaml limits.max_input_pixels, 4096x4096): a larger
# mask would be refused there anyway. It bounds the gateway's memory for one mask (64 MiB as RGBA).
MAX_MASK_PIXELS = 4096 * 4096


def _alpha(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image.getchannel("A")
    if "transparency" in image.info:  # palette or single-colour transparency (PNG tRNS)
        return image.convert("RGBA").getchannel("A")
    raise invalid("mask", f"a {image.mode} image without an alpha channel is not allowed; OpenAI's masks "
                          f"are transparent (alpha 0) where the image is to be edited")


def repaint_mask(data: bytes) -> bytes:
    """A grayscale PNG, white where ``data`` (OpenAI's mask) is fully transparent, black elsewhere."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns below its error; ours is the size check below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=MASK_FORMATS)
        width, height = image.size
        if width * height > MAX_MASK_PIXELS:
            raise invalid("mask", f"{width}x{height} is not allowed; at most {MAX_MASK_PIXELS} pixels")
        image.load()
        alpha = _alpha(ImageOps.exif_transpose(image))
    except ApiError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise invalid("mask", f"{len(data)} bytes that are not a {' or '.join(MASK_FORMATS)} image of at most "
                              f"{MAX_MASK_PIXELS} pixels are not allowed") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for truncated or corrupt files
        raise invalid("mask", f"the file cannot be decoded ({type(exc).__name__}: {exc}); "
                              f"it must be a whole PNG or WebP image") from None
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    buffer = io.BytesIO()
    repaint.save(buffer, format="PNG")
    return buffer.getvalue()
