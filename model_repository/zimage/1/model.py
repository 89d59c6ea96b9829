"""Triton Python-backend glue for Z-Image. The logic lives in the zimage_backend package."""

import json
import logging
import os
import threading
from pathlib import Path

import triton_python_backend_utils as pb_utils

from zimage_backend import audit
from zimage_backend.checked_settings import load_checked_settings
from zimage_backend.engine import Engine, resolve_device
from zimage_backend.metrics import Metrics
from zimage_backend.request import INPUTS, OUTPUTS
from zimage_backend.service import Service
from zimage_backend.settings import CONFIG_ENV

log = logging.getLogger("zimage_backend.model")


def _triton_error(code: str, message: str):
    # pb_utils.TritonError exists only once the stub runs a model, not during auto-complete.
    # Triton has no RESOURCE_EXHAUSTED; the message keeps the word for clients to match.
    codes = pb_utils.TritonError
    triton_code = {"INVALID_ARG": codes.INVALID_ARG, "CANCELLED": codes.CANCELLED,
                   "UNAVAILABLE": codes.UNAVAILABLE, "RESOURCE_EXHAUSTED": codes.UNAVAILABLE,
                   }.get(code, codes.INTERNAL)
    return pb_utils.TritonError(message, triton_code)


class _Incoming:
    """The view of a Triton request that zimage_backend.service works with."""

    def __init__(self, request):
        self._request = request
        self.tensors = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        self.requested_outputs = set(request.requested_output_names())

    def is_cancelled(self) -> bool:
        return self._request.is_cancelled()


def _config_path(args: dict) -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    parameters = json.loads(args["model_config"]).get("parameters", {})
    relative = parameters.get("config_file", {}).get("string_value", "../../config.yaml")
    return Path(args["model_repository"]) / relative


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        for spec in INPUTS:
            config.add_input({"name": spec.name, "data_type": f"TYPE_{spec.triton_dtype}",
                              "dims": list(spec.dims), "optional": spec.optional})
        for spec in OUTPUTS:
            config.add_output({"name": spec.name, "data_type": f"TYPE_{spec.triton_dtype}",
                               "dims": list(spec.dims)})
        config.set_dynamic_batching()
        return config

    def initialize(self, args):
        # Off unless $ZIMAGE_AUDIT_RECORD names a file: the security test's record of what
        # this process opens, runs and connects to.
        audit.install_from_env()
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s zimage %(levelname)s %(name)s: %(message)s")
        path = _config_path(args)
        settings = load_checked_settings(path)
        device = resolve_device(args["model_instance_kind"], args["model_instance_device_id"])
        log.info("instance %s on %s, settings from %s", args["model_instance_name"], device, path)
        self.engine = Engine(settings, device)
        labels = {"model": args["model_name"], "version": args["model_version"],
                  "device": str(device)}
        self.service = Service(self.engine, Metrics(pb_utils.MetricFamily, labels))
        self.model_name, self.instance_name = args["model_name"], args["model_instance_name"]
        self._leaving = False

    def execute(self, requests):
        # Each request is answered through its response sender the moment its answer is final,
        # so execute() returns None (Python backend >= 24.07 allows this without decoupling).
        senders = [r.get_response_sender() for r in requests]
        answered: set[int] = set()  # requests whose final response was sent
        incoming: list[_Incoming] = []

        def send(index: int, response) -> None:
            if index in answered:
                return
            try:
                senders[index].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:  # noqa: BLE001 - left unanswered, it gets the error answer below
                log.exception("the answer to request %d of %d could not be sent", index,
                              len(requests))
                return
            answered.add(index)

        def on_answer(index: int, answer) -> None:
            send(index, self._response(incoming[index], answer))

        try:
            incoming.extend(_Incoming(r) for r in requests)
            self.service.execute(incoming, on_answer)
        except Exception:  # noqa: BLE001 - every request still gets exactly one answer
            log.exception("execute failed for %d request(s)", len(requests))
        error = _triton_error("INTERNAL", "internal error: the server could not answer")
        for index in set(range(len(requests))) - answered:
            send(index, pb_utils.InferenceResponse(error=error))
        if self.service.broken is not None and not self._leaving:
            self._leave_service()
        return None

    def _leave_service(self) -> None:
        """After a sticky CUDA error no call on this process's device can succeed again: unload
        the model, so that Triton's readiness turns false and a load balancer or Kubernetes
        stops sending requests here (README, "A broken GPU"). The 2.51 Python backend has no
        per-instance readiness, and a stub that exits leaves the model ready, failing every
        request. Unloading needs --model-control-mode=explicit, which the launcher sets."""
        self._leaving = True
        log.error("instance %s leaves service: %s; unloading model %s", self.instance_name,
                  self.service.broken, self.model_name)

        def unload() -> None:
            try:
                pb_utils.unload_model(self.model_name)
            except Exception:  # noqa: BLE001 - then requests keep getting UNAVAILABLE
                log.exception("could not unload model %s; it stays loaded and answers "
                              "UNAVAILABLE", self.model_name)

        # Not from this thread: the unload waits for the execute() in flight, this one.
        threading.Thread(target=unload, name="zimage-leave-service", daemon=True).start()

    @staticmethod
    def _response(request: _Incoming, answer):
        if answer.error is not None:
            return pb_utils.InferenceResponse(
                error=_triton_error(answer.error.code, answer.error.message))
        wanted = request.requested_outputs
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(name, array) for name, array in answer.outputs.items()
            if not wanted or name in wanted])

    def finalize(self):
        # Triton calls this only after the last execute() has returned, so no work is in flight;
        # dropping the pipeline gives its device memory back before the stub exits.
        log.info("finalizing %s", self.engine.device)
        del self.service, self.engine
