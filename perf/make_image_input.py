#!/usr/bin/env python3
"""perf_analyzer input data for the image modes (issue 14): perf/inputs.json's requests with an
image, a mask or a control image added, each in perf_analyzer's ``b64`` form for BYTES inputs.

perf_analyzer reads a BYTES element of real input data as its serialized form: a 4-byte
little-endian length, then the bytes (its docs, "Real Input Data"). The images are drawn here,
not loaded, so the file is the same on every machine and nothing large lives in git:

    python perf/make_image_input.py --mode img2img --size 1024 --output /tmp/img2img.json
    perf/perf_analyzer.sh /tmp/img2img.json -i grpc -u localhost:8001 --concurrency-range 1:4

``--mode control`` needs a server with a configured ControlNet (config.yaml ``controlnet``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
MODES = ("img2img", "inpaint", "control")
# The measured settings (issue 14, point 8).
STRENGTH = 0.6
CONTROL_SCALE = 0.7


def b64_bytes_element(data: bytes) -> Dict[str, str]:
    """One BYTES element as perf_analyzer's real input data takes it."""
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(size: int) -> Image.Image:
    """A sky-to-ground gradient with a sun: smooth, so its PNG stays small at 1024x1024."""
    rows = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    sky, ground = np.array([70, 130, 220], np.float32), np.array([40, 120, 50], np.float32)
    pixels = np.broadcast_to(sky * (1 - rows) + ground * rows, (size, size, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    ImageDraw.Draw(image).ellipse(_sun(size), fill=(250, 220, 90))
    return image


def _sun(size: int) -> List[int]:
    return [size // 4, size // 8, size // 2, size * 3 // 8]


def mask(size: int) -> Image.Image:
    """White (repaint) over the lower half, where the ground is."""
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).rectangle([0, size // 2, size - 1, size - 1], fill=255)
    return image


def control_image(size: int) -> Image.Image:
    """Edges of the picture, as a Canny preprocessor would give them: white lines on black."""
    image = Image.new("RGB", (size, size), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse(_sun(size), outline=(255, 255, 255), width=max(1, size // 256))
    draw.line([0, size // 2, size, size // 2], fill=(255, 255, 255), width=max(1, size // 256))
    return image


def input_data(mode: str, size: int, steps: Optional[int] = None) -> Dict[str, list]:
    """perf/inputs.json's rows at ``size`` with the inputs of ``mode`` added."""
    rows = json.loads((HERE / "inputs.json").read_text())["data"]
    extra: Dict[str, object] = {}
    if mode in ("img2img", "inpaint"):
        extra.update(IMAGE_INPUT=b64_bytes_element(_png(picture(size))), STRENGTH=[STRENGTH])
    if mode == "inpaint":
        extra["MASK"] = b64_bytes_element(_png(mask(size)))
    if mode == "control":
        extra.update(CONTROL_IMAGE=b64_bytes_element(_png(control_image(size))), CONTROL_SCALE=[CONTROL_SCALE])
    for row in rows:
        row.update(HEIGHT=[size], WIDTH=[size], **extra)
        if steps is not None:
            row["NUM_INFERENCE_STEPS"] = [steps]
    return {"data": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="img2img")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels, a multiple of 16")
    parser.add_argument("--steps", type=int, default=None, help="NUM_INFERENCE_STEPS (default: inputs.json's)")
    parser.add_argument("--output", type=Path, default=None, help="where to write (default: stdout)")
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 16:
        parser.error(f"--size {args.size}: must be a multiple of 16")
    text = json.dumps(input_data(args.mode, args.size, args.steps), indent=1) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
