"""model.py's answers through a fake pb_utils: every request gets exactly one final response,
also when sending one fails, and a broken device unloads the model once."""

from __future__ import annotations

import importlib.util
import sys
import threading
import types

import numpy as np
import pytest

from tests.conftest import ROOT
from zimage_backend.service import Answer, ServingError


class TritonError:
    INVALID_ARG, CANCELLED, UNAVAILABLE, INTERNAL = range(4)

    def __init__(self, message, code=3):
        self.message, self.code = message, code


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.tensors, self.error = output_tensors or [], error


class Sender:
    def __init__(self, failures: int = 0):
        self.failures, self.sent = failures, []

    def send(self, response, flags=None):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("response too large for the shared memory")
        self.sent.append(response)


class Request:
    def __init__(self, sender):
        self.sender = sender

    def get_response_sender(self):
        return self.sender

    def inputs(self):
        return []

    def requested_output_names(self):
        return []

    def is_cancelled(self):
        return False


@pytest.fixture()
def model_module(monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TritonError, fake.InferenceResponse = TritonError, InferenceResponse
    fake.Tensor = lambda name, array: (name, array)
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    fake.unloaded = []
    fake.unload_model = fake.unloaded.append
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location(
        "zimage_model_under_test", ROOT / "model_repository" / "zimage" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, fake


class FakeService:
    def __init__(self, answers, broken=None, raise_after=None):
        self.answers, self.broken, self.raise_after = answers, broken, raise_after

    def execute(self, incoming, on_answer):
        for index, answer in enumerate(self.answers):
            if index == self.raise_after:
                raise RuntimeError("bug")
            on_answer(index, answer)


def model_with(module, service):
    model = module.TritonPythonModel()
    model.service, model.model_name, model.instance_name = service, "zimage", "zimage_0"
    model._leaving = False
    return model


OK = Answer(outputs={"SEED": np.array([[1]], dtype=np.int64)})


def test_a_failed_send_is_answered_with_an_error_once(model_module):
    module, _ = model_module
    senders = [Sender(), Sender(failures=1), Sender()]
    model = model_with(module, FakeService([OK, OK, OK]))
    model.execute([Request(s) for s in senders])
    assert [len(s.sent) for s in senders] == [1, 1, 1]
    assert senders[0].sent[0].error is None and senders[2].sent[0].error is None
    assert senders[1].sent[0].error.code == TritonError.INTERNAL


def test_a_sender_that_never_works_is_not_retried_forever(model_module):
    module, _ = model_module
    senders = [Sender(failures=5), Sender()]
    model_with(module, FakeService([OK, OK])).execute([Request(s) for s in senders])
    assert senders[0].failures == 3 and len(senders[1].sent) == 1


def test_a_crash_answers_only_the_unanswered(model_module):
    module, _ = model_module
    senders = [Sender(), Sender()]
    model_with(module, FakeService([OK, OK], raise_after=1)).execute(
        [Request(s) for s in senders])
    assert senders[0].sent[0].error is None
    assert senders[1].sent[0].error.code == TritonError.INTERNAL
    assert "Traceback" not in senders[1].sent[0].error.message


def test_a_broken_device_unloads_the_model_once(model_module):
    module, fake = model_module
    broken = Answer(error=ServingError("UNAVAILABLE", "UNAVAILABLE: broken"))
    model = model_with(module, FakeService([broken], broken="CUDA error: an illegal memory "
                                                            "access was encountered"))
    for _ in range(2):
        sender = Sender()
        model.execute([Request(sender)])
        assert sender.sent[0].error.code == TritonError.UNAVAILABLE
    for thread in threading.enumerate():
        if thread.name == "zimage-leave-service":
            thread.join(5)
    assert fake.unloaded == ["zimage"]
