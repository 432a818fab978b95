"""Handler timeouts for a batch of attempts: one timer per batch, not per attempt.

`asyncio.timeout` around each handler cost ~4 µs an attempt (a `Timeout`, and
a timer handle pushed on the event loop's heap and cancelled), ~8% of the CPU
a run spends per compensation (`python -m bench.cpu`). The attempts a run
starts together with the same timeout share one timer here: when it fires,
those still running are cancelled, and the attempt tells its own timeout
from any other cancellation (`timed_out`). A timeout counts from the
attempt's start (its task's creation), not from its handler's first line:
the same within the few milliseconds a batch takes to start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

Attempt = asyncio.Task[Any]


class HandlerTimeouts:
    """The timers of the attempts in flight, and the attempts they cancelled."""

    def __init__(self) -> None:
        # Each attempt's batch (the attempts of it still running) and its timer.
        self._batch_of: dict[Attempt, tuple[set[Attempt], asyncio.TimerHandle]] = {}
        self._expired: set[Attempt] = set()

    def watch(self, attempts: Iterable[Attempt], timeout: float) -> None:
        """Cancel those of `attempts` still running `timeout` seconds from now."""
        batch = set(attempts)
        if not batch:
            return
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, batch)
        for attempt in batch:
            self._batch_of[attempt] = (batch, timer)

    def _expire(self, batch: set[Attempt]) -> None:
        for attempt in batch:
            if not attempt.done():
                self._expired.add(attempt)
                attempt.cancel()

    def timed_out(self, attempt: Attempt) -> bool:
        """In `attempt`, which caught a CancelledError: whether it came from its
        timeout alone. If so, the cancellation is taken back (the attempt goes
        on to record its outcome); if it was also cancelled otherwise (the run
        stopping), the caller lets the CancelledError through."""
        if attempt not in self._expired:
            return False
        self._expired.discard(attempt)
        return attempt.uncancel() == 0

    def finished(self, attempt: Attempt) -> bool:
        """Forget a finished attempt. True when it was cancelled by its timeout
        before it could take the cancellation back (before it first ran)."""
        watched = self._batch_of.pop(attempt, None)
        if watched is not None:
            batch, timer = watched
            batch.discard(attempt)
            if not batch:
                timer.cancel()
        expired = attempt in self._expired
        self._expired.discard(attempt)
        return expired and attempt.cancelled()

    def close(self) -> None:
        """Cancel every timer (the run is over)."""
        for _, timer in self._batch_of.values():
            timer.cancel()
        self._batch_of.clear()
        self._expired.clear()
