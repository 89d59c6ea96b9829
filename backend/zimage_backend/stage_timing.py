"""Times the stages of one pipeline call.

On CUDA with events on the GPU's clock: no sync between stages, so the CPU queues the next
stage's kernels while the GPU still runs this one's. On the CPU with the wall clock. A stage
measured inside another (the VAE encoding of an image input and the control branch run inside
the pipeline's denoising call, timed by module hooks) is taken out of the one around it, so the
stages add up to the call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch


class StageTimer:
    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._spans: list[tuple[str, str | None, object, object]] = []
        self._open: dict[str, tuple[str | None, object]] = {}

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self, name: str, within: str | None = None) -> None:
        self._open[name] = (within, self._mark())

    def end(self, name: str) -> None:
        within, start = self._open.pop(name)
        self._spans.append((name, within, start, self._mark()))

    @contextlib.contextmanager
    def stage(self, name: str, within: str | None = None):
        self.begin(name, within)
        yield
        self.end(name)

    def timings_ms(self) -> dict[str, float]:
        """Milliseconds per stage, each nested stage's time taken out of its outer one."""
        totals: dict[str, float] = {}
        nested: list[tuple[str, float]] = []
        for name, within, start, end in self._spans:
            if self._cuda:
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = (end - start) * 1000
            totals[name] = totals.get(name, 0.0) + ms
            if within is not None:
                nested.append((within, ms))
        for outer, ms in nested:
            totals[outer] -= ms
        return {name: round(ms, 3) for name, ms in totals.items()}


def time_module(module: torch.nn.Module, name: str, within: str,
                current: Callable[[], StageTimer | None]) -> None:
    """Adds every forward of `module` to stage `name` of the timer `current()` returns, if any."""

    def before(*_):
        if (timer := current()) is not None:
            timer.begin(name, within)

    def after(*_):
        if (timer := current()) is not None:
            timer.end(name)

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)
