"""Fan-out helpers for ``generate_many``, shared by the sync and asyncio clients.

Both clients send one request per prompt, up to ``concurrency`` at once so that
every model instance has the next request waiting (Triton hands each instance
one request at a time; see model_repository/zimage/config.pbtxt), and must agree
on how seeds are spread, how progress is reported and how failures surface; that
policy lives here once.
"""

from __future__ import annotations

import logging
import numbers
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from ._tensors import IMAGE_ARGUMENT_NAMES, GenerateRequest, image_arguments
from .errors import ZImageError
from .generated_image import GeneratedImage

__all__ = ["Outcome", "ProgressHook", "expand_seeds", "build_requests", "ProgressReporter", "collect_results"]

_LOGGER = logging.getLogger(__name__)

Outcome = Union[GeneratedImage, BaseException]
# Either a callable ``(index, outcome) -> None`` or a tqdm-like object with ``update(n)``.
ProgressHook = Union[Callable[[int, Outcome], Any], Any]


def expand_seeds(seed: Any, count: int) -> List[Optional[int]]:
    """Per-prompt seeds.

    An int is a base (prompt ``i`` gets ``seed + i``) so a batch is reproducible
    without every prompt getting the same noise; a sequence gives each prompt its
    own seed and must match the prompt count; None lets the server pick.
    """
    if seed is None:
        return [None] * count
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(count)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise TypeError(f"seed must be an int, a sequence of ints or None, got {type(seed).__name__}")
    seeds = list(seed)
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} prompts")
    return seeds


def build_requests(prompts: Iterable[str], seed: Any, **common: Any) -> List[GenerateRequest]:
    """Validate every request before any is sent, so a bad argument fails fast instead of mid-batch."""
    if isinstance(prompts, str):
        # A lone string would otherwise be fanned out one character per image.
        raise TypeError("prompts must be a sequence of str, not a single str; use generate() for one prompt")
    prompts = list(prompts)
    seeds = expand_seeds(seed, len(prompts))
    # One image for every prompt: read and encoded once, not once per row.
    common.update(image_arguments(**{name: common.pop(name, None) for name in IMAGE_ARGUMENT_NAMES}))
    return [GenerateRequest(prompt, seed=s, **common) for prompt, s in zip(prompts, seeds)]


def check_concurrency(concurrency: Any) -> int:
    if isinstance(concurrency, bool) or not isinstance(concurrency, numbers.Integral) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive int, got {concurrency!r}")
    return int(concurrency)


class ProgressReporter:
    """Calls the user's progress hook once per finished prompt, one call at a time.

    The sync client finishes prompts on worker threads; serialising the hook means
    user code (a tqdm bar, a file writer) need not be thread-safe.  An exception
    from the hook is kept and re-raised by the caller after the batch, because
    raising it inside a worker would only kill that worker.
    """

    def __init__(self, hook: Optional[ProgressHook]) -> None:
        self._hook = hook
        self._lock = threading.Lock()
        self.error: Optional[BaseException] = None

    def __call__(self, index: int, outcome: Outcome) -> None:
        if self._hook is None:
            return
        with self._lock:
            if self.error is not None:
                return
            try:
                if callable(self._hook):
                    self._hook(index, outcome)
                else:
                    self._hook.update(1)
            except Exception as exc:  # re-raised by the caller once all requests are done
                self.error = exc


def collect_results(outcomes: Sequence[Optional[Outcome]]) -> List[GeneratedImage]:
    """Return the images in prompt order, or raise the failure of the lowest prompt index.

    The raised exception (when it is a ``ZImageError``) carries ``index`` (shown in
    its message), ``results`` (a list in prompt order with ``None`` where a prompt
    failed) and ``errors`` (``{index: exception}`` for every failure), so images
    that did succeed are not lost.
    """
    errors: Dict[int, BaseException] = {i: o for i, o in enumerate(outcomes) if isinstance(o, BaseException)}
    missing = [i for i, o in enumerate(outcomes) if o is None]
    if missing:
        raise RuntimeError(f"internal error: no outcome for prompts {missing}")
    if not errors:
        return list(outcomes)  # type: ignore[arg-type]
    results = [None if isinstance(o, BaseException) else o for o in outcomes]
    for index, error in errors.items():
        if isinstance(error, ZImageError):
            error.index = index
            error.results = results
            error.errors = errors  # type: ignore[assignment]
        _LOGGER.debug("prompt #%d failed: %r", index, error)
    raise errors[min(errors)]
