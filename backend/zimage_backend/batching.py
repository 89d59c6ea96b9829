"""Plans pipeline calls for the requests of one Triton `execute()`."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def plan_calls(items: Sequence[T], key: Callable[[T], Hashable], max_per_call: int) -> list[list[T]]:
    """Groups items that can share one pipeline call (equal `key(item)`), in order of first
    arrival, and splits each group into calls of at most `max_per_call` items."""
    if max_per_call < 1:
        raise ValueError(f"max_per_call must be at least 1, got {max_per_call}")
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [group[start:start + max_per_call]
            for group in groups.values()
            for start in range(0, len(group), max_per_call)]
