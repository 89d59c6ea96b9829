"""Per-key admission: at most N requests of one API key generate at once, at most M wait for a
slot, and none waits longer than a bound; the others are answered 429 at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import AsyncIterator, Dict

from .errors import ApiError

__all__ = ["KeyLimiter"]


@dataclasses.dataclass
class _Key:
    slots: asyncio.Semaphore
    waiting: int = 0


class KeyLimiter:
    def __init__(self, max_concurrent: int, max_waiting: int, max_wait_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        # One entry per configured key (or "anonymous"): bounded by the key file.
        self._keys: Dict[str, _Key] = {}

    def _rejected(self, why: str) -> ApiError:
        return ApiError(429, f"too many requests for this API key: {why} (limits: {self.max_concurrent} "
                             f"generating, {self.max_waiting} waiting, {self.max_wait_s:g} s wait)",
                        type="rate_limit_exceeded", code="rate_limit_exceeded", headers={"retry-after": "1"})

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Hold one of ``key``'s generation slots for the block; raises a 429 ``ApiError``."""
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key(asyncio.Semaphore(self.max_concurrent))
        if state.slots.locked() and state.waiting >= self.max_waiting:
            raise self._rejected(f"{self.max_concurrent} generating and {state.waiting} waiting already")
        state.waiting += 1
        try:
            await asyncio.wait_for(state.slots.acquire(), self.max_wait_s)
        except asyncio.TimeoutError:
            raise self._rejected(f"no slot came free within {self.max_wait_s:g} s") from None
        finally:
            state.waiting -= 1
        try:
            yield
        finally:
            state.slots.release()
