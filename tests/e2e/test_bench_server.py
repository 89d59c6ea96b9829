"""bench/server.py's CPU dry run: the real server, several sizes from one start, no
perf_analyzer, a warm restart (bench/gpu.sh round2bf16 and round2fp8 run it on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_sizes_from_one_start(tmp_path: Path):
    out, images = tmp_path / "server.json", tmp_path / "images.npz"
    run = subprocess.run(
        [sys.executable, "-m", "bench.server", "--load-format", "tiny", "--sizes", "64,128",
         "--steps", "2", "--repeats", "2,1", "--concurrency", "",
         "--set", "optimizations.warmup.sizes=[[64, 64]]", "--save-images", str(images),
         # A fresh machine lacks the bf16 run's images: timings still written.
         "--compare-images", str(tmp_path / "absent.npz"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["size"] == 64 and result["sizes"] == [64, 128]
    assert result["latency"]["n"] == 2 and result["latency_other_sizes"]["128"]["n"] == 1
    assert list(result["latency_other_sizes"]) == ["128"]
    for latency in (result["latency"], result["latency_other_sizes"]["128"]):
        assert latency["stage_ms"]["denoise"] > 0 and latency["median_s"] > 0
    assert result["cold_start_s"] > 0 and result["warm_restart_s"] > 0
    assert result["perf_analyzer"] == []
    assert "deviation_from_reference" not in result
    with np.load(images) as saved:  # the first size's timed images, seeds 1 and 2
        assert [saved[k].shape for k in saved.files] == [(64, 64, 3)] * 2
    # The phases are in the JSON exactly when the instance logged them.
    for key, log in (("startup_phases_cold", "server_cold.log"),
                     ("startup_phases_warm", "server_warm.log")):
        logged = "startup phases (s): " in (Path(result["logs"]) / log).read_text()
        assert (key in result) == logged, key
