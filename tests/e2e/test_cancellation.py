"""A gRPC client that cancels or times out stops its generation at the next denoising step.

The slow request is 1536x1536 with 50 steps on the tiny model: ~0.25 s a step on a 2-core CPU,
~15 s in all, so a cancel 1.5 s in leaves most of the work undone. The server's log says how
many steps ran ("stopped after k of 50 denoising steps"), zimage_request_errors_total counts the
CANCELLED answer, and a request sent right after the cancel is answered in a fraction of the
time the cancelled one still had to go.

HTTP has no cancellation in Triton 2.51: a client that times out or closes its connection
leaves the generation running to the end (the last test shows it).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tests.e2e.helpers import (
    ANSWER_TIMEOUT_S,
    MODEL,
    LogWatch,
    infer_inputs,
    metric,
    new_client,
    scrape,
    send,
)
from zimage_client import AsyncZImageClient, ZImageClient, ZImageTimeoutError

pytestmark = pytest.mark.e2e

SLOW_SIZE, SLOW_STEPS = 1536, 50
RUN_BEFORE_CANCEL_S = 1.5
STOPPED = r"cancelled during generation: .* stopped after (\d+) of (\d+) denoising steps"


def tensors(size, steps, seed, prompt=b"cancel me"):
    return [("PROMPT", np.array([[prompt]], dtype=np.object_), "BYTES"),
            ("HEIGHT", np.array([[size]], np.int32), "INT32"),
            ("WIDTH", np.array([[size]], np.int32), "INT32"),
            ("NUM_INFERENCE_STEPS", np.array([[steps]], np.int32), "INT32"),
            ("SEED", np.array([[seed]], np.int64), "INT64")]


SLOW = tensors(SLOW_SIZE, SLOW_STEPS, 1)
QUICK = tensors(64, 1, 2, b"right after")


def cancelled_total(server) -> float:
    return metric(scrape(server), "zimage_request_errors_total", code="CANCELLED")


class Cancellation:
    """Watches one cancellation: the server's log line, its metric, and the next request."""

    def __init__(self, server, tally, name):
        self.server, self.tally, self.name = server, tally, f"cancellation, {name}"
        self.log = LogWatch(server.log_file)
        self.cancelled_before = cancelled_total(server)
        self.started = time.perf_counter()
        self.cancelled_at: float | None = None

    def cancelled(self) -> None:
        self.cancelled_at = time.perf_counter() - self.started

    def check(self, next_request_s: float) -> tuple[int, int]:
        """Asserts the server stopped between steps and the next request was answered quickly
        (and counts it); returns (steps run, steps asked)."""
        found = self.log.wait_for(STOPPED)
        assert len(found) == 1, f"no cancellation in the server log: {self.log.new_lines()}"
        done, total = int(found[0].group(1)), int(found[0].group(2))
        assert total == SLOW_STEPS and 1 <= done < total, found[0].group(0)
        # The steps that ran took at least until the cancel; the rest would have taken as long
        # each. The next request waited for one step at most, not for the rest.
        per_step_s = self.cancelled_at / done
        remaining_s = (total - done) * per_step_s
        assert next_request_s < 0.25 * remaining_s, (
            f"the next request took {next_request_s:.2f} s; the cancelled one had "
            f"{remaining_s:.1f} s of steps to go")
        deadline = time.monotonic() + 10
        while cancelled_total(self.server) < self.cancelled_before + 1:
            assert time.monotonic() < deadline, "zimage_request_errors_total{code=CANCELLED}"
            time.sleep(0.1)
        assert cancelled_total(self.server) == self.cancelled_before + 1
        self.tally.note(self.name, f"stopped after {done} of {total} steps, next request "
                                        f"{next_request_s:.2f} s (vs ~{remaining_s:.1f} s left)")
        self.tally.count(self.name, "ok (the next request)")
        return done, total


def quick_request_s(client) -> float:
    answer = send(client, "grpc", QUICK)
    assert answer.ok, answer
    return answer.seconds


def test_grpc_cancel_stops_at_the_next_step(server, tally):
    watch = Cancellation(server, tally, "gRPC call.cancel()")
    client = new_client(server, "grpc")
    answers, done = [], threading.Event()

    def callback(result, error):
        answers.append((result, error))
        done.set()

    call = client.async_infer(MODEL, infer_inputs("grpc", SLOW), callback,
                              client_timeout=ANSWER_TIMEOUT_S)
    time.sleep(RUN_BEFORE_CANCEL_S)
    call.cancel()
    watch.cancelled()
    assert done.wait(10)
    next_s = quick_request_s(client)
    watch.check(next_s)
    time.sleep(0.2)
    client.close()
    [(result, error)] = answers  # exactly one answer
    assert result is None and str(error.status()) == "StatusCode.CANCELLED", error
    tally.count(watch.name, "grpc CANCELLED")


def test_grpc_deadline_stops_at_the_next_step(server, tally):
    watch = Cancellation(server, tally, "gRPC client_timeout")
    client = new_client(server, "grpc")
    answer = send(client, "grpc", SLOW, client_timeout=RUN_BEFORE_CANCEL_S)
    watch.cancelled()
    assert (answer.status, answer.message) == ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded")
    watch.check(quick_request_s(client))
    client.close()
    tally.count(watch.name, "grpc DEADLINE_EXCEEDED")


def test_our_client_timeout_stops_generation(server, tally):
    watch = Cancellation(server, tally, "ZImageClient inference_timeout_s")
    with ZImageClient(server.grpc_url, protocol="grpc",
                      inference_timeout_s=RUN_BEFORE_CANCEL_S) as c:
        with pytest.raises(ZImageTimeoutError):
            c.generate("cancel me", height=SLOW_SIZE, width=SLOW_SIZE,
                       num_inference_steps=SLOW_STEPS)
    watch.cancelled()
    client = new_client(server, "grpc")
    watch.check(quick_request_s(client))
    client.close()
    tally.count(watch.name, "ZImageTimeoutError")


def test_cancelling_an_asyncio_task_stops_generation(server, tally):
    watch = Cancellation(server, tally, "AsyncZImageClient task.cancel()")

    async def scenario():
        async with AsyncZImageClient(server.grpc_url, protocol="grpc") as c:
            task = asyncio.create_task(c.generate("cancel me", height=SLOW_SIZE, width=SLOW_SIZE,
                                                  num_inference_steps=SLOW_STEPS))
            await asyncio.sleep(RUN_BEFORE_CANCEL_S)
            task.cancel()
            watch.cancelled()
            with pytest.raises(asyncio.CancelledError):
                await task
            started = time.perf_counter()
            result = await c.generate("right after", height=64, width=64,
                                      num_inference_steps=1, seed=3)
            assert result.seed == 3
            return time.perf_counter() - started

    watch.check(asyncio.run(scenario()))
    tally.count(watch.name, "asyncio.CancelledError")


def test_a_cancelled_request_still_in_the_queue_never_runs(server, tally):
    """Cancelled while it waits behind another: Triton's queue (a queue policy is set) drops it
    and answers CANCELLED itself; it never reaches the model, and counts in Triton's
    nv_inference_request_failure{reason="CANCELED"}, not in zimage_request_errors_total."""
    watch = Cancellation(server, tally, "queued request cancelled")
    dropped_before = metric(scrape(server), "nv_inference_request_failure", reason="CANCELED")
    client = new_client(server, "grpc")
    answers = {"slow": [], "queued": []}
    events = {name: threading.Event() for name in answers}

    def callback(name):
        def record(result, error):
            answers[name].append(error)
            events[name].set()
        return record

    slow = client.async_infer(MODEL, infer_inputs("grpc", SLOW), callback("slow"),
                              client_timeout=ANSWER_TIMEOUT_S)
    time.sleep(0.5)
    queued = client.async_infer(MODEL, infer_inputs("grpc", tensors(64, 1, 4, b"queued")),
                                callback("queued"), client_timeout=ANSWER_TIMEOUT_S)
    time.sleep(0.5)
    queued.cancel()
    time.sleep(RUN_BEFORE_CANCEL_S - 1.0)
    slow.cancel()
    watch.cancelled()
    assert events["slow"].wait(10) and events["queued"].wait(10)
    watch.check(quick_request_s(client))  # one "stopped after" line: the slow request's
    client.close()
    assert metric(scrape(server), "nv_inference_request_failure",
                  reason="CANCELED") == dropped_before + 1
    assert all(len(errors) == 1 and str(errors[0].status()) == "StatusCode.CANCELLED"
               for errors in answers.values()), answers
    tally.count(watch.name, "grpc CANCELLED", sent=2, answered=2)


def test_http_has_no_cancellation(server, tally):
    """Documents Triton 2.51: an HTTP client that gives up does not stop its generation."""
    log = LogWatch(server.log_file)
    before = scrape(server)
    images_before = metric(before, "zimage_images_generated_total")
    with ZImageClient(server.http_url, protocol="http", inference_timeout_s=0.5) as c:
        with pytest.raises(ZImageTimeoutError):
            c.generate("not cancellable", height=1024, width=1024, num_inference_steps=20)
    gave_up = time.perf_counter()
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while metric(scrape(server), "zimage_images_generated_total") < images_before + 1:
        assert time.monotonic() < deadline, "the abandoned generation never finished"
        time.sleep(0.1)
    ran_on_s = time.perf_counter() - gave_up
    assert cancelled_total(server) == metric(before, "zimage_request_errors_total",
                                             code="CANCELLED")
    assert not [line for line in log.new_lines() if "cancelled" in line]
    name = "cancellation, HTTP client timeout"
    tally.count(name, "ZImageTimeoutError, generation not stopped")
    tally.note(name, f"the abandoned generation ran {ran_on_s:.1f} s after the client gave up")
