"""perf/make_image_input.py: perf_analyzer input data for the image modes, its BYTES elements in the
serialized form perf_analyzer expects (4-byte little-endian length, then the file)."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

SCRIPT = ROOT / "perf" / "make_image_input.py"
SHIPPED = json.loads((ROOT / "perf" / "inputs.json").read_text())["data"]


def make(tmp_path, *args: str) -> list:
    output = tmp_path / "inputs.json"
    run = subprocess.run([sys.executable, str(SCRIPT), *args, "--output", str(output)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(output.read_text())["data"]


def element(value: dict) -> Image.Image:
    raw = base64.b64decode(value["b64"])
    (length,) = struct.unpack("<I", raw[:4])
    assert length == len(raw) - 4  # one element: the length prefix covers the rest
    image = Image.open(io.BytesIO(raw[4:]))
    image.load()
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize("mode, inputs", [
    ("img2img", {"IMAGE_INPUT", "STRENGTH"}),
    ("inpaint", {"IMAGE_INPUT", "STRENGTH", "MASK"}),
    ("control", {"CONTROL_IMAGE", "CONTROL_SCALE"}),
])
def test_each_mode_adds_its_inputs_to_the_shipped_requests(tmp_path, mode, inputs):
    rows = make(tmp_path, "--mode", mode, "--size", "64", "--steps", "2")
    assert len(rows) == len(SHIPPED)
    for row, shipped in zip(rows, SHIPPED):
        added = set(row) - set(shipped)
        assert added == inputs
        assert row["PROMPT"] == shipped["PROMPT"] and row["SEED"] == shipped["SEED"]
        assert (row["HEIGHT"], row["WIDTH"], row["NUM_INFERENCE_STEPS"]) == ([64], [64], [2])
        for name in inputs & {"IMAGE_INPUT", "MASK", "CONTROL_IMAGE"}:
            assert element(row[name]).size == (64, 64)
    scales = {"STRENGTH": [0.6], "CONTROL_SCALE": [0.7]}
    assert all(rows[0][name] == value for name, value in scales.items() if name in inputs)


def test_the_mask_repaints_the_lower_half(tmp_path):
    (row, *_) = make(tmp_path, "--mode", "inpaint", "--size", "64")
    mask = np.asarray(element(row["MASK"]))
    assert mask.shape == (64, 64) and (mask[32:] == 255).all() and (mask[:32] == 0).all()


def test_full_size_files_are_the_same_every_time_and_small(tmp_path):
    first = make(tmp_path, "--mode", "inpaint", "--size", "1024")
    assert element(first[0]["IMAGE_INPUT"]).size == (1024, 1024)
    assert first == make(tmp_path, "--mode", "inpaint", "--size", "1024")
    assert len(json.dumps(first)) < 200_000
    assert first[0]["NUM_INFERENCE_STEPS"] == SHIPPED[0]["NUM_INFERENCE_STEPS"]


def test_sizes_that_are_not_multiples_of_16_are_refused(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--size", "100"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "must be a multiple of 16" in run.stderr
