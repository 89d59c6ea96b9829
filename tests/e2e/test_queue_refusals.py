"""Triton's own refusals reach our client as their own exception types, and its metrics count
them as README says: a queue timeout in nv_inference_request_failure{reason="REJECTED"}, a full
queue in no counter at all (only nv_inference_pending_request_count shows the queue full).

A slow gRPC request holds the session server's one CPU instance; the queue is then filled to
config.pbtxt's max_queue_size with quick requests, so the next ones are refused at once.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.e2e.helpers import ANSWER_TIMEOUT_S, MODEL, infer_inputs, metric, new_client, scrape
from zimage_client import QueueFullError, QueueTimeoutError, ZImageClient, map_triton_error

pytestmark = pytest.mark.e2e

LABELS = {"model": MODEL, "version": "1"}


def _tensors(prompt: bytes, size: int, steps: int):
    return [("PROMPT", np.array([[prompt]], dtype=np.object_), "BYTES"),
            ("HEIGHT", np.array([[size]], np.int32), "INT32"),
            ("WIDTH", np.array([[size]], np.int32), "INT32"),
            ("NUM_INFERENCE_STEPS", np.array([[steps]], np.int32), "INT32")]


def _pending(server) -> float:
    return metric(scrape(server), "nv_inference_pending_request_count", **LABELS)


def _wait_for_pending(server, count: int, timeout_s: float = 30.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (pending := _pending(server)) != count and time.monotonic() < deadline:
        time.sleep(0.1)
    return pending


def _failures(samples) -> dict[str, float]:
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "nv_inference_request_failure" and LABELS.items() <= dict(labels).items()}


def test_queue_refusals_are_typed_and_counted_as_documented(server, tally):
    with ZImageClient(server.grpc_url, protocol="grpc") as c:
        policy = c.model_config()["dynamic_batching"]["default_queue_policy"]
    max_queue = int(policy["max_queue_size"])
    raw = new_client(server, "grpc")
    answered = threading.Semaphore(0)
    errors: list = []

    def on_answer(result, error):
        errors.append(error)
        answered.release()

    holder = raw.async_infer(MODEL, infer_inputs("grpc", _tensors(b"hold", 1536, 50)),
                             on_answer, client_timeout=ANSWER_TIMEOUT_S)
    time.sleep(1.0)  # the holder executes now
    assert _wait_for_pending(server, 0) == 0
    before = scrape(server)
    try:
        # A queue timeout (allow_timeout_override; microseconds) while the instance is held.
        with pytest.raises(InferenceServerException) as timed_out:
            raw.infer(MODEL, infer_inputs("grpc", _tensors(b"impatient", 64, 1)),
                      timeout=300_000, client_timeout=ANSWER_TIMEOUT_S)
        assert type(map_triton_error(timed_out.value)) is QueueTimeoutError, timed_out.value

        for _ in range(max_queue):
            raw.async_infer(MODEL, infer_inputs("grpc", _tensors(b"filler", 64, 1)), on_answer,
                            client_timeout=ANSWER_TIMEOUT_S)
        assert _wait_for_pending(server, max_queue) == max_queue
        full = {}
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            with ZImageClient(url, protocol=protocol) as c:
                started = time.perf_counter()
                with pytest.raises(QueueFullError) as refused:
                    c.generate("one too many", height=64, width=64, num_inference_steps=1)
                full[protocol] = time.perf_counter() - started
            assert refused.value.code == "UNAVAILABLE"
            assert "Exceeds maximum queue size" in refused.value.message
        during = scrape(server)
    finally:
        holder.cancel()
    for _ in range(1 + max_queue):
        assert answered.acquire(timeout=ANSWER_TIMEOUT_S)
    raw.close()
    assert errors.count(None) == max_queue, errors  # every filler was generated; the holder not

    # A full queue refuses at once, and no counter of Triton's counts it.
    assert max(full.values()) < 1.0, full
    assert metric(during, "nv_inference_pending_request_count", **LABELS) == max_queue
    assert _failures(during) == {**_failures(before), "REJECTED": _failures(before)["REJECTED"] + 1}
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count"):
        assert metric(during, name, **LABELS) == metric(before, name, **LABELS), name
    tally.count("queue refusals", "QueueTimeoutError", sent=1, answered=1)
    tally.count("queue refusals", "QueueFullError", sent=2, answered=2)
    tally.note("queue refusals", "full queue refused in " + ", ".join(
        f"{protocol} {seconds * 1000:.0f} ms" for protocol, seconds in full.items()))
