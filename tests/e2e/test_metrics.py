"""Our custom metrics on Triton's metrics port, next to its nv_inference_* ones, after known
traffic. The session server has served other tests before, so every check is on differences."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest

from tests.e2e.helpers import metric, new_client, send, settled_scrape
from zimage_backend.metrics import STAGE_BUCKETS_MS, STAGES
from zimage_client import InvalidRequestError, ZImageClient

pytestmark = pytest.mark.e2e

SIZES = [(64, 64), (64, 96), (96, 64)]  # one pipeline call each: sent one after the other
LABELS = {"model": "zimage", "version": "1", "device": "cpu"}


def _histogram_ok(samples, name: str, **labels: str) -> None:
    """Cumulative buckets that end in +Inf == _count, as Prometheus requires."""
    buckets = sorted(
        ((float(dict(ls)["le"]), value) for (n, ls), value in samples.items()
         if n == f"{name}_bucket" and set(labels.items()) <= set(ls)),
        key=lambda b: b[0])
    assert buckets, f"no buckets for {name} {labels}"
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), buckets
    assert buckets[-1][0] == float("inf")
    assert buckets[-1][1] == metric(samples, f"{name}_count", **labels)


def test_metrics_after_traffic(server, tally):
    before = settled_scrape(server)
    with ZImageClient(server.grpc_url, protocol="grpc", inference_timeout_s=60) as c:
        for height, width in SIZES:
            c.generate("metrics", height=height, width=width, num_inference_steps=1)
        for bad in (dict(height=100), dict(prompt=" ")):
            with pytest.raises(InvalidRequestError):
                c.generate(**{"prompt": "metrics", "width": 64, "height": 64, **bad})
    # Refused by Triton itself (wrong dtype): never reaches the model.
    client = new_client(server, "http")
    answer = send(client, "http", [("PROMPT", np.array([[b"x"]], np.object_), "BYTES"),
                                   ("HEIGHT", np.array([[64.0]], np.float32), "FP32")])
    client.close()
    assert answer.status == "400"
    after = settled_scrape(server)
    tally.count("metrics", "ok", sent=3, answered=3)
    tally.count("metrics", "INVALID_ARG", sent=3, answered=3)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    # Text-to-image traffic: the image modes' stages are tests/e2e/test_image_inputs.py's.
    for stage in (s for s in STAGES if s not in ("vae_encode", "control")):
        assert delta("zimage_stage_duration_ms_count", stage=stage) == len(SIZES), stage
        assert delta("zimage_stage_duration_ms_sum", stage=stage) > 0, stage
        _histogram_ok(after, "zimage_stage_duration_ms", stage=stage)
        les = sorted(float(dict(ls)["le"]) for (n, ls) in after
                     if n == "zimage_stage_duration_ms_bucket" and dict(ls)["stage"] == stage)
        assert les == [*map(float, STAGE_BUCKETS_MS), float("inf")]
    assert delta("zimage_images_generated_total") == len(SIZES)
    assert delta("zimage_request_errors_total", code="INVALID_ARG") == 2
    assert delta("zimage_batch_size_count") == len(SIZES)
    assert delta("zimage_batch_size_sum") == len(SIZES)  # one image per call
    assert delta("zimage_batch_wait_ms_count") == len(SIZES)
    assert delta("zimage_batch_wait_ms_sum") >= 0
    for name in ("zimage_batch_size", "zimage_batch_wait_ms"):
        _histogram_ok(after, name)
    # Every custom sample carries the model, version and device labels.
    for (name, labels) in after:
        if name.startswith("zimage_"):
            assert LABELS.items() <= dict(labels).items(), (name, labels)

    # Triton's own: it counts the requests our model answered with an error as successes (the
    # model did answer them), and the one it refused itself (before its scheduler) nowhere;
    # only zimage_request_errors_total tells a generated image from an error.
    assert delta("nv_inference_request_success", model="zimage") == len(SIZES) + 2
    assert delta("nv_inference_request_failure", model="zimage") == 0
    assert delta("nv_inference_count", model="zimage") == len(SIZES) + 2
    assert delta("nv_inference_request_duration_us", model="zimage") > 0
    assert ("nv_inference_pending_request_count",
            frozenset({("model", "zimage"), ("version", "1")})) in after

    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    types = dict(re.findall(r"^# TYPE (zimage_\w+) (\w+)$", text, re.MULTILINE))
    assert types == {"zimage_stage_duration_ms": "histogram",
                     "zimage_images_generated_total": "counter",
                     "zimage_request_errors_total": "counter",
                     "zimage_batch_size": "histogram", "zimage_batch_wait_ms": "histogram"}
