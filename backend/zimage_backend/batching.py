"""Plans pipeline calls for the requests of one Triton `execute()`."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def plan_calls(items: Sequence[T], key: Callable[[T], Hashable],
               max_per_call: int | Callable[[T], int]) -> list[list[T]]:
    """Groups items that can share one pipeline call (equal `key(item)`), in order of first
    arrival, and splits each group into calls of at most `max_per_call` items (a number, or a
    function of the group's first item)."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    calls = []
    for group in groups.values():
        size = max_per_call(group[0]) if callable(max_per_call) else max_per_call
        if size < 1:
            raise ValueError(f"max_per_call must be at least 1, got {size}")
        calls.extend(group[start:start + size] for start in range(0, len(group), size))
    return calls
