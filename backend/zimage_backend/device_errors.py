"""What a failed pipeline call says about the device: out of memory, broken, or neither.

The service answers by it: out of memory is RESOURCE_EXHAUSTED (the caller may retry smaller or
later, and the instance stays in service); a sticky CUDA error means the process's CUDA context is
unusable until the process ends, so the instance answers UNAVAILABLE and leaves service; anything
else is INTERNAL and only fails its own call.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Allocation failures that do not arrive as torch.OutOfMemoryError: cuBLAS and cuDNN workspaces,
# and CUDA runtime allocations outside the caching allocator.
_OUT_OF_MEMORY = (
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "CUDA out of memory",
    "CUDA error: out of memory",
    "cudaErrorMemoryAllocation",
)
# CUDA errors after which every later call on the context fails ("sticky" errors): CUDA's own
# documentation says the process must terminate to recover.
_STICKY = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ECC error",
    "GPU has fallen off the bus",
    "CUDA error: unknown error",
    "cudaErrorIllegalAddress",
    "cudaErrorAssert",
    "cudaErrorLaunchFailure",
)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: its cause and context, and the `inner_exception` that torch's
    compiler errors (BackendCompilerFailed, InductorError) carry."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "inner_exception", None)]


def is_out_of_memory(exc: BaseException) -> bool:
    return any(isinstance(e, torch.OutOfMemoryError) or any(m in str(e) for m in _OUT_OF_MEMORY)
               for e in chain(exc))


def sticky_error(exc: BaseException) -> str | None:
    """The first line of the sticky CUDA error inside `exc`, or None when there is none."""
    for e in chain(exc):
        text = str(e)
        if any(marker in text for marker in _STICKY):
            return text.strip().splitlines()[0][:300]
    return None
