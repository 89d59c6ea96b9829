"""Two compiled variants of one module, and the rule that picks one per call.

torch.compile gives a module one compiled variant. Two places want a second one:

- **CUDA graphs for small images** (`GraphPool`). Below about 512x512 the transformer is
  launch-bound: at 256x256 its 34 blocks x 8 steps of small kernels left the GPU waiting for the
  CPU, and replaying the blocks as CUDA graphs halved denoising (issue 15). A graph holds memory
  for its activations and is recorded per shape, so graphs serve only calls of at most
  `max_pixels` pixels, and only the first `size` keys (batch, height, width, caption bucket,
  mode) seen: the pool is bounded and never evicts; later keys run the plain compiled code. What
  each key's recording added to the memory the allocator reserves is kept in `memory`.
- **Static code for warmed shapes** (`StaticShapes`). After a second shape torch.compile makes a
  module's code dynamic, and the dynamic VAE decoder was 6-8 ms slower at 1024x1024 than static
  code (issue 15). Every shape a module meets before the engine is ready (its check run and the
  warmup) gets static code of its own; any other shape runs the dynamic variant.

The two variants are separate `torch.compile` wrappers of the module's call: dynamo keeps each
wrapper's code apart (its guards check the backend), so neither recompiles the other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

GraphKey = tuple[int, int, int, int, str]  # batch, height, width, caption bucket, mode
CAPTION_BUCKET = 32  # the transformer pads each caption to a multiple of 32 tokens


def caption_bucket(lengths: list[int]) -> int:
    """The caption length the transformer's blocks see for prompts of these token lengths."""
    return -(-max(lengths) // CAPTION_BUCKET) * CAPTION_BUCKET


def install(module: torch.nn.Module, choose_second: Callable[[tuple, dict], bool],
            second: Callable) -> None:
    """Makes `module` run `second` for the calls `choose_second(args, kwargs)` picks and its
    compiled code (`module.compile` first) for the others."""
    first = module._compiled_call_impl
    if first is None:
        raise ValueError(f"{type(module).__name__} is not compiled")

    def call(*args, **kwargs):
        return (second if choose_second(args, kwargs) else first)(*args, **kwargs)

    module._compiled_call_impl = call


class GraphPool:
    """Which transformer calls replay CUDA graphs (the engine opens `call` around each one)."""

    def __init__(self, max_pixels: int, size: int, device: torch.device):
        self.max_pixels, self.size, self.device = max_pixels, size, device
        self.memory: dict[GraphKey, int] = {}  # bytes reserved by each key's recording
        self.active = False  # read by the blocks' dispatch, set only inside `call`

    def admits(self, key: GraphKey) -> bool:
        _, height, width, _, _ = key
        return height * width <= self.max_pixels and (key in self.memory or
                                                      len(self.memory) < self.size)

    @contextlib.contextmanager
    def call(self, key: GraphKey) -> Iterator[bool]:
        """Graphs on for this call when the pool admits its key; yields whether they are."""
        if not self.admits(key):
            yield False
            return
        new = key not in self.memory
        before = self._reserved() if new else 0
        self.active = True
        try:
            yield True
        finally:
            self.active = False
        if new:
            # Kept only once the key's first call has finished: a failed one records again.
            self.memory[key] = self._reserved() - before
            log.info("CUDA graphs for batch %d, %dx%d, caption %d, %s: +%.1f MiB reserved "
                     "(%d of %d keys)", *key, self.memory[key] / 2**20, len(self.memory),
                     self.size)

    def _reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0

    def mark_steps(self, transformer: torch.nn.Module):
        """Each transformer forward starts a new run of the graphs: the previous step's block
        outputs, consumed by then, may be overwritten. Returns the hook's handle."""
        def begin(module, args, kwargs):
            if self.active:
                torch.compiler.cudagraph_mark_step_begin()
        return transformer.register_forward_pre_hook(begin, with_kwargs=True)

    def describe(self) -> str:
        held = sum(self.memory.values()) / 2**20
        return (f"{len(self.memory)} of {self.size} keys recorded, +{held:.1f} MiB reserved "
                f"by their recordings")


class StaticShapes:
    """The input shapes that run static code: those seen while `learning`."""

    def __init__(self) -> None:
        self.shapes: set[tuple[int, ...]] = set()
        self.learning = True

    def choose(self, args: tuple, kwargs: dict) -> bool:
        shape = tuple(_first_tensor(args, kwargs).shape)
        if self.learning:
            self.shapes.add(shape)
        return shape in self.shapes


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("a call without a tensor argument")
