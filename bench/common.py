"""Helpers shared by the benchmark scripts: statistics, card identity, result files."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a red fox in fresh snow, golden hour, 85mm, highly detailed"


def summarize(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_s": round(statistics.median(ordered), 4), "p90_s": round(p90, 4),
            "min_s": round(ordered[0], 4), "n": len(ordered)}


def deviation(test: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """How far images are from reference images of the same seeds (uint8 pixels)."""
    a = np.stack(test).astype(np.float64)
    b = np.stack(reference).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {"mean_abs_of_255": round(float(np.mean(np.abs(a - b))), 3),
            "psnr_db": round(10 * np.log10(255**2 / mse), 2) if mse else float("inf"),
            "relative_l2": round(float(np.linalg.norm(a - b) / np.linalg.norm(b)), 5)}


def card() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"name": "cpu", "count": 0}
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__}


def commit() -> str:
    """$ZIMAGE_COMMIT when set: a copied tree's git (the GPU machines') may report another HEAD."""
    if os.environ.get("ZIMAGE_COMMIT"):
        return os.environ["ZIMAGE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp() -> dict[str, Any]:
    return {"card": card(), "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def config_with(overrides: dict[str, Any], base: Path = ROOT / "config.yaml") -> Path:
    """A copy of the shipped config.yaml with dotted-key overrides, e.g. the one line
    `model.load_format: dummy`. Everything else stays as shipped."""
    data = yaml.safe_load(base.read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"{dotted} is not a key of {base}")
        node[leaf] = value
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="zimage-bench-",
                                         delete=False)
    with handle:
        yaml.safe_dump(data, handle)
    return Path(handle.name)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are YAML (true, 3, [a, b], null)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


@dataclasses.dataclass
class Timer:
    """Wall-clock seconds around GPU work: synchronizes before reading the clock."""

    seconds: float = 0.0

    def __enter__(self):
        import time

        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import time

        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start


# Our own servers only: an http_proxy from the environment must not see these requests.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def infer_over_http(http_url: str, body: bytes, headers: dict[str, str],
                    timeout_s: float = 600) -> tuple[float, dict, int]:
    """One inference over Triton's HTTP API: (seconds, the answer's JSON header, the bytes of
    binary data after it). An HTTP error status raises urllib's HTTPError."""
    request = urllib.request.Request(f"http://{http_url}/v2/models/zimage/infer", data=body,
                                     method="POST", headers=headers)
    started = time.perf_counter()
    with DIRECT.open(request, timeout=timeout_s) as response:
        raw = response.read()
        length = int(response.headers.get("Inference-Header-Content-Length", len(raw)))
    return time.perf_counter() - started, json.loads(raw[:length]), len(raw) - length
