"""The result type returned for every generated image."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
from PIL import Image

__all__ = ["GeneratedImage", "FILE_EXTENSIONS"]

# Extension a saved image gets per output format; raw pixels are saved as PNG
# because PNG is lossless, so the file holds exactly the pixels the server sent.
FILE_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "raw": ".png"}
_WAIT_KEYS = frozenset({"queue", "wait", "queue_wait"})


@dataclass(frozen=True, eq=False)
class GeneratedImage:
    """One generated image plus what the server reported about producing it.

    ``data`` is kept next to the decoded ``image`` so that saving does not
    re-encode (a JPEG/WebP round trip would lose quality and change the bytes the
    server produced).  ``pixels`` is always an ``(H, W, 3)`` uint8 array: the
    server's PIXELS tensor for ``raw``, the decoded image otherwise, so numeric
    consumers need not care which format was requested.

    Equality is identity (``eq=False``): field-wise ``==`` over numpy arrays and
    PIL images is ambiguous or expensive, and two generations are distinct results
    even when their pixels match.
    """

    image: Image.Image
    data: Optional[bytes] = field(repr=False)
    pixels: np.ndarray = field(repr=False)
    seed: int
    format: str
    timings_ms: Dict[str, Any]
    metadata: Dict[str, Any]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

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
