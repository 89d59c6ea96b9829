"""bench/quality.py's image metrics (PSNR, SSIM) on cases whose answer is known, and its
verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import quality


def _image(seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 216, size=(size, size, 3), dtype=np.uint8)


def test_identical_images():
    a = _image(0)
    assert quality.psnr(a, a.copy()) == math.inf
    assert quality.ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_error():
    a = _image(1)
    b = a + np.uint8(10)  # 10 everywhere: MSE 100 (no pixel wraps: a <= 215)
    assert quality.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)
    c = a.copy()
    c[::2] += np.uint8(20)  # half the rows off by 20: MSE 200
    assert quality.psnr(a, c) == pytest.approx(10 * math.log10(255**2 / 200), abs=1e-9)


def test_ssim_of_flat_images_is_the_luminance_term():
    """No variance: SSIM is (2ab + C1) / (a^2 + b^2 + C1) exactly."""
    a = np.full((32, 32, 3), 100, np.uint8)
    b = np.full((32, 32, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert quality.ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100**2 + 140**2 + c1),
                                               rel=1e-12)


def test_ssim_falls_with_noise_and_is_symmetric():
    a = _image(2, 64).astype(np.float64)
    rng = np.random.default_rng(3)
    noisy = [np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)
             for sigma in (2, 10, 40)]
    scores = [quality.ssim(a.astype(np.uint8), n) for n in noisy]
    assert 1 > scores[0] > scores[1] > scores[2] > 0
    assert quality.ssim(noisy[1], a.astype(np.uint8)) == pytest.approx(scores[1], rel=1e-12)
    # Uncorrelated images score near 0, far below a noisy copy.
    assert abs(quality.ssim(_image(4, 64), _image(5, 64))) < 0.05


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        quality.ssim(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))


def test_the_verdict_needs_fp8_applied_and_lpips():
    rows = [{"psnr_db": 24.0, "ssim": 0.9, "lpips": 0.1}, {"psnr_db": 22.0, "ssim": 0.8,
                                                            "lpips": 0.16}]
    assert quality.verdict(rows, None, "applied")["result"] == "fail"  # one LPIPS above 0.15
    rows[1]["lpips"] = 0.12
    assert quality.verdict(rows, None, "applied")["result"] == "pass"
    assert quality.verdict(rows, "LPIPS skipped", "applied")["result"] == "not judged: no LPIPS here"
    assert quality.verdict(rows, None, "skipped")["result"].startswith("not judged: fp8 was")
    rows[0]["psnr_db"] = 17.0  # mean 19.5 dB
    assert quality.verdict(rows, None, "applied")["result"] == "fail"
