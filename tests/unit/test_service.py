"""The service in-process, over the real tiny pipeline (and a failing engine for error paths)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zimage_backend.engine import BatchResult
from zimage_backend.service import Service

from .test_request import tensors


class Incoming:
    requested_outputs: set[str] = set()

    def __init__(self, cancelled=False, **values):
        self.tensors = tensors(**values)
        self.cancelled = cancelled

    def is_cancelled(self):
        return self.cancelled


@pytest.fixture(scope="module")
def service(engine):
    return Service(engine)


def pixels_of(answer):
    assert answer.error is None, answer.error.message
    return answer.outputs["PIXELS"][0]


def test_batched_equals_single_up_to_rounding(service):
    prompts = [("a cat", 1), ("a dog running on a beach with a red ball", 2), ("sky", 3)]
    batched = service.execute([Incoming(PROMPT=p, SEED=s, HEIGHT=64, WIDTH=64,
                                        OUTPUT_FORMAT="raw") for p, s in prompts])
    for (prompt, seed), answer in zip(prompts, batched):
        meta = json.loads(answer.outputs["METADATA"][0, 0])
        assert meta["batch_size"] == 3
        alone = service.execute([Incoming(PROMPT=prompt, SEED=seed, HEIGHT=64, WIDTH=64,
                                          OUTPUT_FORMAT="raw")])[0]
        assert json.loads(alone.outputs["METADATA"][0, 0])["batch_size"] == 1
        diff = np.abs(pixels_of(answer).astype(int) - pixels_of(alone).astype(int))
        # Batched matmuls round differently in the last float bit: at most 1 of 255, rarely.
        assert diff.max() <= 1
        assert (diff > 0).mean() < 0.005


def test_seed_decides_the_image(service):
    a, b, c = service.execute([Incoming(PROMPT="a cat", SEED=s, HEIGHT=64, WIDTH=64,
                                        OUTPUT_FORMAT="raw") for s in (7, 7, 8)])
    # Rows of one batched product may round differently in the last bit (CPU GEMM blocking):
    # the same bound as batched against single, far below what another seed changes.
    same = np.abs(pixels_of(a).astype(int) - pixels_of(b).astype(int))
    assert same.max() <= 1 and (same > 0).mean() < 0.005
    assert np.abs(pixels_of(a).astype(int) - pixels_of(c).astype(int)).mean() > 5
    assert [int(x.outputs["SEED"][0, 0]) for x in (a, b, c)] == [7, 7, 8]


def test_bad_request_does_not_fail_its_batch(service):
    answers = service.execute([
        Incoming(PROMPT="good one", HEIGHT=64, WIDTH=64),
        Incoming(PROMPT="bad", HEIGHT=65, WIDTH=64),
        Incoming(PROMPT="", HEIGHT=64, WIDTH=64),
        Incoming(PROMPT="good two", HEIGHT=64, WIDTH=80, OUTPUT_FORMAT="webp"),
    ])
    assert answers[0].error is None and answers[3].error is None
    assert answers[1].error.code == "INVALID_ARG" and answers[1].error.message.startswith("HEIGHT")
    assert answers[2].error.code == "INVALID_ARG" and answers[2].error.message.startswith("PROMPT")
    assert answers[3].outputs["IMAGE"][0, 0][:4] == b"RIFF"


def test_mixed_sizes_get_their_own_size(service):
    sizes = [(64, 64), (64, 96), (96, 64), (64, 64)]
    answers = service.execute([Incoming(PROMPT="x", HEIGHT=h, WIDTH=w, OUTPUT_FORMAT="raw")
                               for h, w in sizes])
    assert [pixels_of(a).shape for a in answers] == [(h, w, 3) for h, w in sizes]
    assert json.loads(answers[0].outputs["METADATA"][0, 0])["batch_size"] == 2


def test_cancelled_request_is_answered_cancelled(service):
    answers = service.execute([Incoming(PROMPT="x", HEIGHT=64, WIDTH=64, cancelled=True),
                               Incoming(PROMPT="y", HEIGHT=64, WIDTH=64)])
    assert answers[0].error.code == "CANCELLED"
    assert answers[1].error is None


class CancelledAfterStep:
    """A request that its client cancels once the engine has run `step` denoising steps,
    counted as transformer forwards (guidance 0: one per step)."""

    tensors = tensors(PROMPT="x", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=8)
    requested_outputs: set[str] = set()

    def __init__(self, engine, step: int):
        self.step, self.forwards = step, 0
        self._hook = engine.pipe.transformer.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.forwards += 1

    def is_cancelled(self):
        return self.forwards >= self.step

    def close(self):
        self._hook.remove()


@pytest.fixture()
def cancelled_after_step_2(engine):
    request = CancelledAfterStep(engine, step=2)
    yield request
    request.close()


def test_cancel_during_denoising_stops_between_steps(engine, cancelled_after_step_2):
    [answer] = Service(engine).execute([cancelled_after_step_2])
    assert answer.error.code == "CANCELLED"
    # No denoising step runs once the cancellation is visible, however often it is polled.
    assert cancelled_after_step_2.forwards == 2


def test_cancel_during_denoising_is_logged_with_the_steps_run(engine, cancelled_after_step_2,
                                                              caplog):
    """The server log is where an operator sees a cancellation: the client has gone."""
    with caplog.at_level("INFO", logger="zimage_backend.service"):
        Service(engine).execute([cancelled_after_step_2])
    assert "1 request(s) cancelled during generation" in caplog.text
    assert "stopped after 2 of 8 denoising steps" in caplog.text


class FailingEngine:
    """Stands in for a GPU engine to drive the out-of-memory and crash paths on a CPU. Each
    image it makes is filled with its prompt's first byte, so an answer shows whose it is."""

    def __init__(self, engine, fits: int, error=torch.OutOfMemoryError,
                 message="CUDA out of memory. Tried to allocate 20.00 GiB"):
        self.settings, self.device, self.count_tokens = engine.settings, engine.device, len
        self.fits, self.error, self.message = fits, error, message
        self.calls, self.made = [], []

    def run(self, requests, should_stop=None):
        self.calls.append(len(requests))
        if len(requests) > self.fits:
            raise self.error(self.message)
        self.made += [r.prompt for r in requests]
        return BatchResult([np.full((r.height, r.width, 3), ord(r.prompt[0]), np.uint8)
                            for r in requests], {"denoise": 1.0})


def test_out_of_memory_splits_the_batch_then_reports_resource_exhausted(engine):
    fake = FailingEngine(engine, fits=1)
    prompts = [str(i) for i in range(4)]
    answers = Service(fake).execute([Incoming(PROMPT=p, HEIGHT=64, WIDTH=64,
                                              OUTPUT_FORMAT="raw") for p in prompts])
    # Each request gets its own image, made once, in calls that fit, however the split went.
    assert [pixels_of(a)[0, 0, 0] for a in answers] == [ord(p) for p in prompts]
    assert sorted(fake.made) == prompts
    assert fake.calls[0] == 4 and all(n < 4 for n in fake.calls[1:])  # tried whole, then less
    fake = FailingEngine(engine, fits=0)
    [answer] = Service(fake).execute([Incoming(PROMPT="huge", HEIGHT=2048, WIDTH=2048)])
    assert answer.error.code == "RESOURCE_EXHAUSTED"
    assert "2048x2048" in answer.error.message


def test_crash_fails_only_its_call_without_leaking_details(engine):
    fake = FailingEngine(engine, fits=1, error=RuntimeError, message="shape mismatch in /srv/x.py")
    answers = Service(fake).execute([Incoming(PROMPT="a", HEIGHT=64, WIDTH=64),
                                     Incoming(PROMPT="b", HEIGHT=64, WIDTH=64),
                                     Incoming(PROMPT="c", HEIGHT=96, WIDTH=64)])
    assert [a.error.code if a.error else None for a in answers] == ["INTERNAL", "INTERNAL", None]
    assert answers[0].error.message == "generation failed: RuntimeError"


def test_each_request_is_answered_once_as_soon_as_its_call_ends(engine):
    """Triton may queue several requests into one execute(); each is answered when its own
    pipeline call ends, before the next call starts, and exactly once."""
    fake = FailingEngine(engine, fits=1)
    events = []
    runs = fake.run
    fake.run = lambda requests, should_stop=None: (events.append("call"), runs(requests))[1]
    big = [Incoming(PROMPT=str(i), HEIGHT=1024, WIDTH=1024) for i in range(3)]
    bad = Incoming(PROMPT="x", HEIGHT=7, WIDTH=64)
    answers = Service(fake).execute(big + [bad], lambda i, a: events.append(i))
    # The invalid request is answered before any work; then one answer after each call.
    assert events == [3, "call", 0, "call", 1, "call", 2]
    assert [a.error.code if a.error else None for a in answers] == [None, None, None,
                                                                    "INVALID_ARG"]


def test_a_request_of_several_rows_is_answered_after_its_last_row(engine):
    fake = FailingEngine(engine, fits=4)
    events = []
    request = Incoming()
    request.tensors = {"PROMPT": np.array([[b"a"], [b"b"]], dtype=np.object_),
                       "HEIGHT": np.array([[1024], [1024]], dtype=np.int32),
                       "WIDTH": np.array([[1024], [1024]], dtype=np.int32)}
    [answer] = Service(fake).execute([request], lambda i, a: events.append((i, len(fake.calls))))
    assert fake.calls == [1, 1] and events == [(0, 2)]
    assert answer.outputs["IMAGE"].shape == (2, 1)
