"""bench/report.py's round-two section (issue 15), from small JSON files written here in the
shapes bench.baselines and bench.server write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import report

CARD = {"name": "NVIDIA H200", "count": 1, "memory_gib": 139.8, "torch": "2.11.0"}


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / f"{name}.json").write_text(json.dumps(
        {"card": CARD, "commit": "abc1234", "date": "2026-12-01T14:00:00+00:00", **data}))


def _latency(median: float, denoise: float) -> dict:
    return {"first_s": 2.0, "median_s": median, "p90_s": median + 0.01, "min_s": median,
            "n": 10, "stage_ms": {"text_encode": 20.0, "denoise": denoise, "vae_decode": 40.0,
                                  "image_encode": 30.0, "triton_and_transport": 15.0}}


def _served(folder: Path, name: str, medians: dict[int, float], **starts) -> None:
    first, *others = medians
    _write(folder, name, {"size": first, "sizes": list(medians),
                          "latency": _latency(medians[first], 700.0),
                          "latency_other_sizes": {str(s): _latency(medians[s], 50.0 + s / 10)
                                                  for s in others}, **starts})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name, median in (("diffusers_eager", 1.4), ("diffusers_compiled", 0.9)):
        _write(tmp_path, name, {"system": name, "size": 1024, "steps": 8, "first_s": 3.0,
                                "median_s": median, "p90_s": median + 0.02, "n": 10})
    _served(tmp_path, "round2_bf16", {1024: 0.81, 512: 0.19, 256: 0.09},
            cold_start_s=110.0, warm_restart_s=25.0,
            startup_phases_cold={"load": 12.3, "steps": {"fuse_projections": 0.1},
                                 "warmup": 80.5})
    return tmp_path


def _row(lines: list[str], *cells: str) -> str:
    found = [line for line in lines
             if all(f"| {c} |" in line for c in cells)]
    assert len(found) == 1, (cells, lines)
    return found[0]


def test_latency_rows_ratios_and_targets(folder: Path):
    lines = report.round_two(folder)
    assert "| 1.56x |" in _row(lines, "diffusers eager", "1024x1024")
    assert "| 1.00x |" in _row(lines, "diffusers compiled", "1024x1024")
    bf16_1024 = _row(lines, "ours, shipped config (bf16)", "1024x1024")
    assert "| 0.810 |" in bf16_1024 and "| 0.90x |" in bf16_1024
    assert "| <= 0.8 s | **not met** |" in bf16_1024 and "| 700.0 |" in bf16_1024
    bf16_512 = _row(lines, "ours, shipped config (bf16)", "512x512")
    # No diffusers run at 512: no ratio across sizes.
    assert "| <= 0.2 s | met |" in bf16_512 and "| - |" in bf16_512
    assert "| 101.2 |" in bf16_512
    assert "| <= 0.08 s | **not met** |" in _row(lines, "ours, shipped config (bf16)",
                                                 "256x256")


def test_start_rows_and_phases(folder: Path):
    lines = report.round_two(folder)
    cold = _row(lines, "ours, shipped config (bf16)", "cold start (empty compile cache)")
    assert "| 110.0 | <= 120 s | met |" in cold
    assert "load 12.3, steps (fuse_projections 0.1), warmup 80.5" in cold
    warm = _row(lines, "ours, shipped config (bf16)", "warm restart (compile cache kept)")
    assert "| 25.0 | <= 20 s | **not met** | - |" in warm
    assert "Card: NVIDIA H200." in lines


def test_a_missing_file_leaves_its_rows_out(folder: Path):
    lines = report.round_two(folder)
    assert not any("fp8" in line.lower() for line in lines)
    (folder / "diffusers_compiled.json").unlink()
    lines = report.round_two(folder)
    assert not any("| diffusers compiled |" in line for line in lines)
    # Without the compiled baseline no row has a ratio.
    assert "| - |" in _row(lines, "ours, shipped config (bf16)", "1024x1024")
    for name in ("round2_bf16", "diffusers_eager"):
        (folder / f"{name}.json").unlink()
    assert report.round_two(folder) == []


def test_fp8_rows_deviation_and_other_cards(folder: Path):
    _served(folder, "round2_fp8", {1024: 0.50, 512: 0.15, 256: 0.07}, cold_start_s=130.0)
    data = json.loads((folder / "round2_fp8.json").read_text())
    data["deviation_from_reference"] = {"images": 10, "mean_abs_of_255": 1.01,
                                        "psnr_db": 45.5, "relative_l2": 0.0103}
    data["card"] = {**CARD, "name": "NVIDIA H100 80GB HBM3"}
    (folder / "round2_fp8.json").write_text(json.dumps(data))
    lines = report.round_two(folder)
    fp8 = "ours, `optimizations.fp8: true`"
    assert "| 0.56x | 700.0 | <= 0.52 s | met |" in _row(lines, fp8, "1024x1024")
    # The small-size targets are the shipped config's.
    assert "| - | - |" in _row(lines, fp8, "256x256")
    assert "| 130.0 | - | - | - |" in _row(lines, fp8, "cold start (empty compile cache)")
    assert any("PSNR 45.5 dB" in line for line in lines)
    assert any(line.startswith("**Not one card**") and "NVIDIA H100 80GB HBM3 (round2_fp8)"
               in line for line in lines)


def test_results_md_has_the_section(folder: Path, monkeypatch):
    monkeypatch.setattr(report, "plot", lambda *args: None)  # matplotlib: not a test dependency
    monkeypatch.setattr(sys, "argv", ["report", str(folder)])
    report.main()
    text = (folder / "results.md").read_text()
    assert "## Round two (issue 15)" in text
    assert "| ours, shipped config (bf16) | 256x256 | abc1234 | 0.090 |" in text
    assert json.loads((folder / "results.json").read_text())["round2_bf16"]["size"] == 1024


def test_the_candidates_run_has_bf16s_targets_and_its_deviation(folder: Path):
    _served(folder, "round2_candidates", {1024: 0.79, 512: 0.19, 256: 0.07},
            cold_start_s=150.0, warm_restart_s=18.0)
    data = json.loads((folder / "round2_candidates.json").read_text())
    data["deviation_from_reference"] = {"reference": "x.npz", "images": 10,
                                        "mean_abs_of_255": 0.4, "psnr_db": 41.2,
                                        "relative_l2": 0.003}
    (folder / "round2_candidates.json").write_text(json.dumps(data))
    lines = report.round_two(folder)
    label = ("ours, bf16 with transformer graphs, static VAE code and the text encoder stack")
    assert "| <= 0.8 s | met |" in _row(lines, label, "1024x1024")
    assert "| <= 0.08 s | met |" in _row(lines, label, "256x256")
    assert "| 150.0 | <= 120 s | **not met** |" in _row(lines, label, "cold start (empty "
                                                      "compile cache)")
    assert any(line.startswith("The candidates' 10 timed images") and "PSNR 41.2 dB" in line
               for line in lines)
