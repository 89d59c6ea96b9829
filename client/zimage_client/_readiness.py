"""When the server counts as ready, and how long and how often to ask: one policy for the
sync and asyncio clients, which only differ in whether they block or await.

Ready means the server is live and the model is ready, asked in that order so the reason
given names the first that is not. Polling starts fast (a server that is already up answers
at once) and backs off so a long model load does not turn into a busy loop; one probe never
waits longer than PROBE_MAX_S so a hung connection cannot eat the whole wait. A probe that
fails to connect or times out only means "not yet": a starting server refuses connections
for a while.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ._calls import Calls
from ._transport import Transport
from .errors import ZImageTimeoutError

__all__ = ["Check", "readiness_checks", "ReadinessWait"]

_LOGGER = logging.getLogger(__name__)

POLL_INITIAL_S = 0.1
POLL_GROWTH = 1.5
POLL_MAX_S = 1.0
PROBE_MAX_S = 5.0


@dataclass(frozen=True)
class Check:
    """One tritonclient health call and what it means when it answers False."""

    method: str
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    failure: str

    def start(self, client: Any) -> Any:
        """The call's answer; from an aio client, the awaitable of it."""
        return getattr(client, self.method)(*self.args, **self.kwargs)


def readiness_checks(transport: Transport, calls: Calls, timeout_s: float) -> Tuple[Check, ...]:
    """The checks of one probe, in order; the probe stops at the first that answers False."""
    deadline = calls.deadline(timeout_s)
    return (
        Check("is_server_live", (), deadline, "server is not live"),
        Check("is_model_ready", (transport.model_name, transport.model_version), deadline,
              f"server is live but model {transport.model_name!r} is not ready"),
    )


class ReadinessWait:
    """One ``wait_for_ready``: its deadline, the pause before each next probe, and the last
    reason the server gave for not being ready (for the timeout's message)."""

    def __init__(self, transport: Transport, timeout_s: float) -> None:
        self._transport = transport
        self._timeout_s = float(timeout_s)
        self._deadline = time.monotonic() + self._timeout_s
        self._pause_s = POLL_INITIAL_S
        self._reason = "no answer yet"

    def next_probe_s(self) -> float:
        """How long the next probe may take; ``ZImageTimeoutError`` once the wait is over."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            t = self._transport
            raise ZImageTimeoutError(
                f"{t.endpoint.url} model {t.model_name!r} not ready after {self._timeout_s:g} s: {self._reason}"
            )
        return min(remaining, PROBE_MAX_S)

    def not_ready(self, reason: str) -> float:
        """Keeps ``reason``; returns how long to pause before the next probe."""
        self._reason = reason
        _LOGGER.debug("waiting for %s: %s", self._transport.endpoint.url, reason)
        pause_s = max(0.0, min(self._pause_s, self._deadline - time.monotonic()))
        self._pause_s = min(self._pause_s * POLL_GROWTH, POLL_MAX_S)
        return pause_s
