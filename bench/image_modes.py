"""The image modes (issue 14) through our real Triton server, beside plain text-to-image, in one
run on one card: image-to-image at strength 0.6, inpainting, ControlNet at scale 0.7 and
ControlNet inpainting, each with METADATA's stage times (vae_encode and control included) and
its ratio to text-to-image. The server runs the shipped config.yaml with the pipeline and a
ControlNet Union 2.1 in the `dummy` load format (full shapes, random weights: timings only).

HTTP with binary tensors (urllib), so it needs no tritonclient on the GPU machine.

  python -m bench.image_modes --out bench/results/<run>/image_modes.json
  python -m bench.image_modes --load-format tiny --size 64 --steps 2 --repeats 1 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import urllib.error
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import PROMPT, config_with, infer_over_http, stamp, write_json
from bench.server import start
from zimage_backend.triton_process import TritonServer

STAGES = ("text_encode", "vae_encode", "control", "denoise", "vae_decode", "image_encode")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def inputs_for(size: int) -> dict[str, bytes]:
    """A smooth photo-like image, a mask of its middle, and an edge map as the control image."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    photo = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    edges = np.zeros((size, size, 3), dtype=np.uint8)
    edges[::max(1, size // 16)] = 255
    edges[:, ::max(1, size // 16)] = 255
    return {"image": _png(photo), "mask": _png(mask), "control": _png(edges)}


def modes(files: dict[str, bytes]) -> dict[str, dict]:
    return {
        "text_to_image": {},
        "image_to_image": {"IMAGE_INPUT": files["image"], "STRENGTH": 0.6},
        "inpaint": {"IMAGE_INPUT": files["image"], "MASK": files["mask"], "STRENGTH": 0.6},
        "controlnet": {"CONTROL_IMAGE": files["control"], "CONTROL_SCALE": 0.7},
        "controlnet_inpaint": {"CONTROL_IMAGE": files["control"], "IMAGE_INPUT": files["image"],
                               "MASK": files["mask"], "CONTROL_SCALE": 0.7},
    }


def infer(server: TritonServer, fields: dict, size: int, steps: int, seed: int) -> dict:
    """One request over HTTP with binary tensors; METADATA and the seconds it took."""
    tensors = [("PROMPT", PROMPT.encode()), ("HEIGHT", size), ("WIDTH", size),
               ("NUM_INFERENCE_STEPS", steps), ("SEED", seed), *fields.items()]
    header, body = [], b""
    for name, value in tensors:
        if isinstance(value, bytes):
            raw, datatype = struct.pack("<I", len(value)) + value, "BYTES"
        elif isinstance(value, float):
            raw, datatype = struct.pack("<f", value), "FP32"
        else:
            raw, datatype = (struct.pack("<q", value), "INT64") if name == "SEED" else (
                struct.pack("<i", value), "INT32")
        header.append({"name": name, "shape": [1, 1], "datatype": datatype,
                       "parameters": {"binary_data_size": len(raw)}})
        body += raw
    head = json.dumps({"inputs": header, "outputs": [
        {"name": "METADATA"}, {"name": "IMAGE", "parameters": {"binary_data": True}}]}).encode()
    try:
        seconds, answer, _ = infer_over_http(
            server.http_url, head + body, {"Content-Type": "application/octet-stream",
                                           "Inference-Header-Content-Length": str(len(head))})
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{sorted(fields)}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
    metadata = next(o for o in answer["outputs"] if o["name"] == "METADATA")["data"][0]
    return {"seconds": seconds, "metadata": json.loads(metadata)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load-format", default="dummy", help="tiny: a CPU dry run (the tiny "
                        "pipeline and ControlNet)")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="TORCHINDUCTOR_CACHE_DIR for the server (serve's warm cache)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = config_with({"model.load_format": args.load_format,
                          "controlnet.load_format": args.load_format,
                          "optimizations.warmup.sizes": [[args.size, args.size]]})
    env = {"TORCHINDUCTOR_CACHE_DIR": str(args.compile_cache)} if args.compile_cache else {}
    log = args.out.with_name(args.out.stem + "_server.log")
    server, start_s = start(config, log, env)
    results = {}
    try:
        for mode, fields in modes(inputs_for(args.size)).items():
            # The first of each mode pays its one-time costs (cuDNN's choice of the VAE
            # encoder's convolutions, a recompile for a new input); reported apart.
            first = infer(server, fields, args.size, args.steps, 0)
            runs = [infer(server, fields, args.size, args.steps, seed)
                    for seed in range(1, args.repeats + 1)]
            meta = runs[-1]["metadata"]
            results[mode] = {
                "first_s": round(first["seconds"], 3),
                "median_s": round(statistics.median(r["seconds"] for r in runs), 3),
                "stage_ms": {stage: round(statistics.median(
                    r["metadata"]["timings_ms"].get(stage, 0.0) for r in runs), 2)
                    for stage in STAGES if stage in meta["timings_ms"]},
                "denoise_steps": meta["denoise_steps"], "mode": meta["mode"],
                **{k: meta[k] for k in ("strength", "control_scale") if k in meta}}
            print(mode, json.dumps(results[mode]), flush=True)
    finally:
        server.stop()
    base = results["text_to_image"]["median_s"]
    for result in results.values():
        result["ratio_to_text_to_image"] = round(result["median_s"] / base, 3)
    write_json(args.out, {
        "what": (f"{args.size}x{args.size}, {args.steps} steps, one request at a time over "
                 f"HTTP with PNG returned; pipeline and ControlNet Union 2.1 in load format "
                 f"{args.load_format} (random weights: timings only); shipped config.yaml "
                 f"otherwise; median of {args.repeats} after one request per mode"),
        "server_start_s": round(start_s, 1), "modes": results, **stamp()})


if __name__ == "__main__":
    main()
