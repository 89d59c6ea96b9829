"""The service's failure paths: out of memory, a broken device, a failed encode. A fake engine
stands in for the GPU (a CPU raises none of these by itself); the rest is the real service."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError

from zimage_backend import device_errors, service as service_module
from zimage_backend.engine import BatchResult
from zimage_backend.service import Service

from .test_service import Incoming


class HoldsMemoryThenFails:
    """A call of more than `fits` images allocates its 'activations', then runs out of memory,
    as a real pipeline call does; each later call records whether the failed call's tensor was
    still alive when it started."""

    def __init__(self, engine, fits: int, error: BaseException | None = None):
        self.settings, self.device, self.count_tokens = engine.settings, engine.device, len
        self.fits, self.error = fits, error
        self.failed: list[weakref.ref] = []
        self.alive_at_retry: list[bool] = []

    def run(self, requests, should_stop=None):
        self.alive_at_retry += [ref() is not None for ref in self.failed]
        if len(requests) > self.fits:
            activations = torch.ones(1 << 16)
            self.failed.append(weakref.ref(activations))
            raise self.error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return BatchResult([np.zeros((r.height, r.width, 3), np.uint8) for r in requests], {})


def test_the_failed_calls_memory_is_free_before_the_halves_run(engine):
    fake = HoldsMemoryThenFails(engine, fits=1)
    answers = Service(fake).execute([Incoming(PROMPT=str(i), HEIGHT=64, WIDTH=64)
                                     for i in range(2)])
    assert all(a.error is None for a in answers)
    # Inside the except block the traceback keeps the failed call's frame, and its tensor.
    assert fake.alive_at_retry and not any(fake.alive_at_retry)


def _wrapped_by_inductor() -> Exception:
    return InductorError(torch.OutOfMemoryError("CUDA out of memory"), None)


def _wrapped_by_dynamo() -> Exception:
    return BackendCompilerFailed(lambda: None, _wrapped_by_inductor(), None)


def _caused_by_oom() -> Exception:
    try:
        raise torch.OutOfMemoryError("CUDA out of memory")
    except torch.OutOfMemoryError as oom:
        try:
            raise RuntimeError("while running the compiled graph") from oom
        except RuntimeError as exc:
            return exc


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: out of memory"),
    _wrapped_by_inductor(), _wrapped_by_dynamo(), _caused_by_oom(),
], ids=["cublas", "cudnn", "cuda-runtime", "inductor", "dynamo", "cause"])
def test_every_allocation_failure_is_resource_exhausted(engine, error):
    fake = HoldsMemoryThenFails(engine, fits=0, error=error)
    [answer] = Service(fake).execute([Incoming(PROMPT="x", HEIGHT=64, WIDTH=64)])
    assert answer.error.code == "RESOURCE_EXHAUSTED"
    assert answer.error.message.startswith("RESOURCE_EXHAUSTED: out of device memory")


def test_other_failures_stay_internal(engine):
    assert not device_errors.is_out_of_memory(RuntimeError("shape '[2, 3]' is invalid"))
    assert device_errors.sticky_error(RuntimeError("shape '[2, 3]' is invalid")) is None


@pytest.mark.parametrize("message", [
    "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously ...",
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: unspecified launch failure",
])
def test_a_sticky_cuda_error_takes_the_instance_out_of_service(engine, message):
    calls = []

    class Broken:
        settings, device, count_tokens = engine.settings, engine.device, len

        def run(self, requests, should_stop=None):
            calls.append(len(requests))
            raise RuntimeError(message)

    service = Service(Broken())
    first = service.execute([Incoming(PROMPT="a", HEIGHT=64, WIDTH=64)])
    assert first[0].error.code == "UNAVAILABLE"
    assert "is broken and the instance is leaving service" in first[0].error.message
    assert service.broken == message.splitlines()[0]
    # No later call reaches the device; bad input is still named as such.
    later = service.execute([Incoming(PROMPT="b", HEIGHT=64, WIDTH=64),
                             Incoming(PROMPT="c", HEIGHT=65, WIDTH=64)])
    assert [a.error.code for a in later] == ["UNAVAILABLE", "INVALID_ARG"]
    assert calls == [1]


def test_an_encoding_failure_fails_only_its_own_request(engine, monkeypatch):
    real = service_module.encode_image

    def encode(pixels, fmt, *args):
        if fmt == "webp":
            raise OSError("encoder crashed")
        return real(pixels, fmt, *args)

    monkeypatch.setattr(service_module, "encode_image", encode)
    fake = HoldsMemoryThenFails(engine, fits=4)
    answers = Service(fake).execute([Incoming(PROMPT="a", HEIGHT=64, WIDTH=64),
                                     Incoming(PROMPT="b", HEIGHT=64, WIDTH=64,
                                              OUTPUT_FORMAT="webp"),
                                     Incoming(PROMPT="c", HEIGHT=64, WIDTH=64)])
    assert [a.error.code if a.error else None for a in answers] == [None, "INTERNAL", None]
    assert answers[1].error.message == "encoding the webp image failed: OSError"
    assert answers[0].outputs["IMAGE"][0, 0][:4] == b"\x89PNG"
