"""Answers one Triton `execute()` worth of requests: parse, group, generate, encode, reply.

Triton-free so it can be tested with plain numpy; model.py only converts tensors and errors.
Every request gets exactly one `Answer`; one request's failure never fails another's, except
that requests sharing a failed pipeline call share its error. Each answer is handed out as soon
as it is final: an execute() of several requests runs them one pipeline call after another, and
the first should not wait for the last.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from . import device_errors
from .batching import plan_calls
from .encoding import encode_image
from .engine import Engine, GenerationCancelled
from .lora_field import LISTING_OUTPUT, listing
from .metrics import Metrics
from .request import (CONTROL_MODES, STRENGTH_MODES, GenerationRequest, RequestError,
                      check_requested_outputs, parse_request)

log = logging.getLogger(__name__)

# Triton's codes, plus RESOURCE_EXHAUSTED, which Triton lacks: model.py sends it as UNAVAILABLE
# (retry later or smaller) with a message that starts with "RESOURCE_EXHAUSTED".
INVALID_ARG, CANCELLED, UNAVAILABLE, INTERNAL, RESOURCE_EXHAUSTED = (
    "INVALID_ARG", "CANCELLED", "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED")


class ServingError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Incoming(Protocol):
    tensors: Mapping[str, np.ndarray]
    requested_outputs: set[str]  # empty: all outputs

    def is_cancelled(self) -> bool: ...


@dataclasses.dataclass
class Answer:
    outputs: dict[str, np.ndarray] | None = None
    error: ServingError | None = None


@dataclasses.dataclass
class _Item:
    index: int  # which Triton request
    row: int
    request: GenerationRequest


class Service:
    def __init__(self, engine: Engine, metrics: Metrics | None = None):
        self.engine = engine
        self.settings = engine.settings
        self.metrics = metrics or Metrics()
        # Set after a sticky CUDA error: the reason. Every later request is answered UNAVAILABLE
        # without touching the device, and model.py takes the instance out of service.
        self.broken: str | None = None

    def execute(self, incoming: Sequence[Incoming],
                on_answer: Callable[[int, Answer], None] | None = None) -> list[Answer]:
        """Answers `incoming`; `on_answer(index, answer)` runs once per request, as soon as its
        answer is final (its last pipeline call ended, or it failed). Returns every answer."""
        started = time.perf_counter()
        answers = [Answer() for _ in incoming]
        rows: dict[int, list[tuple[np.ndarray, dict[str, Any]] | None]] = {}
        items: list[_Item] = []
        settled: set[int] = set()

        def settle(index: int) -> None:
            answer = answers[index]
            if index in settled or (answer.error is None and any(r is None for r in rows[index])):
                return
            if answer.error is None and answer.outputs is None:
                answer.outputs = _outputs(rows[index])
            settled.add(index)
            # Counted before the answer leaves: a client that reads the metrics next sees it.
            self.metrics.answered([answer.error.code if answer.error else None])
            if on_answer is not None:
                on_answer(index, answer)

        for index, request in enumerate(incoming):
            if request.requested_outputs == {LISTING_OUTPUT}:
                # LoRA (issue 13): the adapter listing alone costs no generation.
                batch = len(next(iter(request.tensors.values()), [None]))
                text = listing(self.settings.adapters, self.settings.limits).encode()
                answers[index].outputs = {LISTING_OUTPUT: np.array([[text]] * batch,
                                                                   dtype=np.object_)}
                rows[index] = []
                settle(index)
                continue
            try:
                parsed = parse_request(request.tensors, self.settings.defaults,
                                       self.settings.limits, self.engine.count_tokens,
                                       adapters=self.settings.adapters,
                                       controlnet=self.settings.controlnet.enabled)
                check_requested_outputs(parsed, request.requested_outputs)
            except RequestError as exc:
                answers[index].error = ServingError(INVALID_ARG, str(exc))
                settle(index)
                continue
            rows[index] = [None] * len(parsed)
            items += [_Item(index, row, r) for row, r in enumerate(parsed)]

        def fail(indexes: set[int], error: ServingError) -> None:
            for i in indexes:
                if answers[i].error is None:
                    answers[i].error = error
                settle(i)

        for call in plan_calls(items, lambda item: item.request.group_key,
                               lambda item: self.settings.limits.images_per_call(
                                   item.request.height, item.request.width)):
            for index in {item.index for item in call}:
                if answers[index].error is None and incoming[index].is_cancelled():
                    fail({index}, ServingError(CANCELLED, "request was cancelled"))
            call = [item for item in call if answers[item.index].error is None]
            if call:
                waited_ms = (time.perf_counter() - started) * 1000
                self._generate(call, incoming, waited_ms, rows, fail)
                self._report_memory()
                for index in {item.index for item in call}:
                    settle(index)

        return answers

    def _generate(self, call: list[_Item], incoming: Sequence[Incoming], waited_ms: float,
                  rows: dict, fail: Callable[[set[int], ServingError], None]) -> None:
        indexes = {item.index for item in call}
        requests = [item.request for item in call]
        if self.broken is not None:
            fail(indexes, self._unavailable())
            return
        out_of_memory = False
        try:
            result = self.engine.run(
                requests, should_stop=lambda: all(incoming[i].is_cancelled() for i in indexes))
        except GenerationCancelled as exc:
            # The server log is the only place that shows it: the client has already gone.
            log.info("%d request(s) cancelled during generation: %s", len(indexes), exc)
            fail(indexes, ServingError(CANCELLED, "request was cancelled during generation"))
            return
        except Exception as exc:  # noqa: BLE001 - one failed call must not fail the others
            if (sticky := device_errors.sticky_error(exc)) is not None:
                log.exception("the device is broken; this instance leaves service")
                self.broken = sticky
                fail(indexes, self._unavailable())
                return
            if not device_errors.is_out_of_memory(exc):
                log.exception("generation failed for %d request(s)", len(indexes))
                fail(indexes, ServingError(INTERNAL, f"generation failed: {type(exc).__name__}"))
                return
            log.warning("out of device memory for %d image(s) of %dx%d: %s", len(call),
                        requests[0].height, requests[0].width, str(exc).splitlines()[0][:200])
            out_of_memory = True
        if out_of_memory:
            # Outside the handler: while it ran, the exception's traceback held the failed
            # call's frames, and with them its latents and activations.
            self._release_memory()
            if len(call) > 1:
                # The batch may be what did not fit: each half gets its own chance.
                half = len(call) // 2
                self._generate(call[:half], incoming, waited_ms, rows, fail)
                self._generate(call[half:], incoming, waited_ms, rows, fail)
                return
            r = requests[0]
            fail(indexes, ServingError(RESOURCE_EXHAUSTED, (
                f"RESOURCE_EXHAUSTED: out of device memory generating {r.height}x{r.width} with "
                f"{r.num_inference_steps} steps; memory was released, retry smaller or later")))
            return
        self.metrics.batch(len(call), result.timings_ms, waited_ms)
        self.metrics.adapter_images(requests[0].loras, len(call))  # one adapter set per call
        label = self.settings.model.weights_label
        for item, pixels in zip(call, result.pixels):
            r = item.request
            timings = {"wait": round(waited_ms, 3), **result.timings_ms}
            encoded = None
            if r.output_format != "raw":
                started = time.perf_counter()
                try:
                    encoded = encode_image(pixels, r.output_format, self.settings.encoding,
                                           {"Software": "zimage-triton", "Weights": label,
                                            "Seed": str(r.seed)})
                except Exception as exc:  # noqa: BLE001 - fails its own request only
                    log.exception("encoding a %s image failed", r.output_format)
                    fail({item.index}, ServingError(
                        INTERNAL, f"encoding the {r.output_format} image failed: "
                                  f"{type(exc).__name__}"))
                    continue
                timings["image_encode"] = round((time.perf_counter() - started) * 1000, 3)
                self.metrics.stage("image_encode", timings["image_encode"])
            metadata = {"timings_ms": timings, "batch_size": len(call), "weights": label,
                        "height": r.height, "width": r.width,
                        "num_inference_steps": r.num_inference_steps,
                        "guidance_scale": r.guidance_scale, "mode": r.mode,
                        "denoise_steps": r.denoise_steps, "cuda_graphs": result.cuda_graphs}
            # As FP32 carried them (0.6, not 0.6000000238418579).
            if r.mode in STRENGTH_MODES:
                metadata["strength"] = float(f"{r.strength:.7g}")
            if r.mode in CONTROL_MODES:
                metadata["control_scale"] = float(f"{r.control_scale:.7g}")
            if r.loras:
                metadata["loras"] = dict(r.loras)
            rows[item.index][item.row] = (encoded if encoded is not None else pixels,
                                          {"seed": r.seed, "metadata": metadata})

    def _unavailable(self) -> ServingError:
        return ServingError(UNAVAILABLE, (
            f"UNAVAILABLE: this instance's device ({self.engine.device}) is broken and the "
            f"instance is leaving service ({self.broken}); retry on another instance"))

    def _report_memory(self) -> None:
        device = self.engine.device
        if device.type == "cuda" and self.broken is None:
            self.metrics.memory(torch.cuda.memory_allocated(device),
                                torch.cuda.memory_reserved(device),
                                torch.cuda.max_memory_reserved(device))

    def _release_memory(self) -> None:
        # Frames of the failed call may sit in reference cycles that only the collector frees.
        gc.collect()
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()


def _outputs(request_rows: list) -> dict[str, np.ndarray]:
    data = [row[0] for row in request_rows]
    extra = [row[1] for row in request_rows]
    outputs = {
        "SEED": np.array([[e["seed"]] for e in extra], dtype=np.int64),
        "METADATA": np.array([[json.dumps(e["metadata"]).encode()] for e in extra],
                             dtype=np.object_),
    }
    if isinstance(data[0], bytes):
        outputs["IMAGE"] = np.array([[d] for d in data], dtype=np.object_)
    else:
        outputs["PIXELS"] = np.stack(data)
    return outputs
