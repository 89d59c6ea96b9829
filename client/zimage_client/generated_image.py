"""The result type returned for every generated image."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
from PIL import Image

from .errors import ZImageResponseError

__all__ = ["GeneratedImage", "FILE_EXTENSIONS"]

# Extension a saved image gets per output format; raw pixels are saved as PNG
# because PNG is lossless, so the file holds exactly the pixels the server sent.
FILE_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "raw": ".png"}
_WAIT_KEYS = frozenset({"queue", "wait", "queue_wait"})


def open_encoded(data: bytes, *, load: bool) -> Image.Image:
    """Open encoded image bytes, fully decoding them only when ``load`` is true.

    Pillow parses the header in ``Image.open`` and the pixel data in ``load``, so
    ``load=False`` is enough to reject a payload that is not an image at all.
    Every call reads its own ``BytesIO``: PIL file objects are not safe to decode
    from two threads at once, a fresh one per decode is.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if load:
            image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ZImageResponseError(f"IMAGE bytes ({len(data)} B) could not be decoded: {exc}") from exc
    return image


@dataclass(frozen=True, eq=False, init=False)
class GeneratedImage:
    """One generated image plus what the server reported about producing it.

    ``data`` is kept next to ``image`` so that saving does not re-encode (a
    JPEG/WebP round trip would lose quality and change the bytes the server
    produced).  ``pixels`` is always a read-only ``(H, W, 3)`` uint8 array: the
    server's PIXELS tensor for ``raw``, the decoded image otherwise, so numeric
    consumers need not care which format was requested.

    Encoded images are decoded lazily, once, on first access of ``image`` or
    ``pixels``: decoding a 1024x1024 PNG costs tens of milliseconds that callers
    who only save or forward ``data`` should not pay.  ``width``/``height`` come
    from the header.  A body that turns out to be corrupt raises
    ``ZImageResponseError`` at that first access.  Concurrent first accesses may
    each decode; the results are equal, so the race is harmless.

    Pass ``pixels=None`` to have them derived from ``image`` (or from ``data``
    when it is set) on first use; ``image`` may then be only header-parsed.

    Equality is identity (``eq=False``): field-wise ``==`` over numpy arrays and
    PIL images is ambiguous or expensive, and two generations are distinct results
    even when their pixels match.
    """

    data: Optional[bytes] = field(repr=False)
    seed: int
    format: str
    timings_ms: Dict[str, Any]
    metadata: Dict[str, Any]
    _image: Image.Image = field(repr=False)
    _decoded: bool = field(repr=False)
    _pixels: Optional[np.ndarray] = field(repr=False)

    def __init__(
        self,
        image: Image.Image,
        data: Optional[bytes],
        pixels: Optional[np.ndarray],
        seed: int,
        format: str,
        timings_ms: Dict[str, Any],
        metadata: Dict[str, Any],
    ) -> None:
        set_ = object.__setattr__
        set_(self, "data", data)
        set_(self, "seed", seed)
        set_(self, "format", format)
        set_(self, "timings_ms", timings_ms)
        set_(self, "metadata", metadata)
        set_(self, "_image", image)
        # Without data there is nothing to decode from; given pixels mean the
        # caller already decoded.
        set_(self, "_decoded", data is None or pixels is not None)
        set_(self, "_pixels", pixels)

    @property
    def image(self) -> Image.Image:
        """The image as a PIL image, fully decoded (on first access, for encoded formats)."""
        if not self._decoded and self.data is not None:
            # _image before _decoded: a thread that sees the flag must see the decoded image.
            object.__setattr__(self, "_image", open_encoded(self.data, load=True))
            object.__setattr__(self, "_decoded", True)
        return self._image

    @property
    def pixels(self) -> np.ndarray:
        """Read-only ``(H, W, 3)`` uint8 RGB array, decoded on first access for encoded formats."""
        pixels = self._pixels
        if pixels is None:
            image = self.image
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            pixels = np.array(rgb, dtype=np.uint8)
            pixels.setflags(write=False)
            object.__setattr__(self, "_pixels", pixels)
        return pixels

    @property
    def width(self) -> int:
        return self._image.width

    @property
    def height(self) -> int:
        return self._image.height

    @property
    def extension(self) -> str:
        """File extension ``save`` targets for this format (``.png`` for raw)."""
        return FILE_EXTENSIONS.get(self.format, "." + self.format)

    @property
    def server_ms(self) -> Optional[float]:
        """Total time the server spent on this request (queueing included), in milliseconds.

        The server's timing keys are not a fixed schema: an explicit ``total`` wins;
        otherwise ``compute`` is treated as an aggregate of the stage entries, so the
        total is the sum of all other entries, or ``compute`` plus the queue/wait
        entries when no stages are itemised.  None when no numeric timings came back.
        """
        timings = {
            k: float(v) for k, v in self.timings_ms.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if not timings:
            return None
        for key in ("total", "total_ms"):
            if key in timings:
                return timings[key]
        parts = {k: v for k, v in timings.items() if k != "compute"}
        if "compute" in timings and all(k in _WAIT_KEYS for k in parts):
            return timings["compute"] + sum(parts.values())
        return sum(parts.values())

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """Write the image to ``path`` and return it as a ``Path``.

        Encoded formats are written byte-for-byte as the server produced them
        (whatever the path's extension says); raw pixels are written as PNG.
        """
        target = Path(path)
        if self.data is not None:
            target.write_bytes(self.data)
        else:
            self.image.save(target, format="PNG")
        return target
