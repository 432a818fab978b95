"""Time as a dependency: the executor never reads the wall clock directly.

`SystemClock` is the real one. `FakeClock` lets tests of long backoffs and
confirmation timeouts run instantly: time moves only when the test says so.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the executor needs from time."""

    def now(self) -> datetime:
        """The current time, UTC-aware."""

    async def sleep_until(self, deadline: datetime) -> None:
        """Wait until this clock reads `deadline` (at once if it is past)."""


class SystemClock:
    """Wall-clock time and real sleeping."""

    def now(self) -> datetime:
        """The current time, UTC-aware."""
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        """Really wait."""
        await asyncio.sleep(max(seconds, 0))

    async def sleep_until(self, deadline: datetime) -> None:
        """Really wait until `deadline`."""
        await self.sleep((deadline - self.now()).total_seconds())


class FakeClock:
    """A clock that only moves when `advance()` is called.

    Sleepers wake, in deadline order, when time reaches their deadline.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        # The task behind each sleeper: one being cancelled no longer counts,
        # even before the cancellation has reached its future.
        self._tasks: dict[int, asyncio.Task[object] | None] = {}
        self._sequence = itertools.count()

    def now(self) -> datetime:
        """The fake current time."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has been advanced by `seconds`."""
        await self.sleep_until(self._now + timedelta(seconds=max(seconds, 0)))

    async def sleep_until(self, deadline: datetime) -> None:
        """Wait until the clock has been advanced to `deadline`.

        A sleeper computes its deadline from the time it read, not from the
        time its task first runs: `advance()` may come in between.
        """
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sequence = next(self._sequence)
        self._tasks[sequence] = asyncio.current_task()
        heapq.heappush(self._sleepers, (deadline, sequence, future))
        try:
            await future
        finally:
            self._tasks.pop(sequence, None)

    def _live(self, sequence: int, future: asyncio.Future[None]) -> bool:
        if future.done():
            return False
        task = self._tasks.get(sequence)
        return task is None or not task.cancelling()

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock."""
        return sum(1 for _, n, f in self._sleepers if self._live(n, f))

    def next_deadline(self) -> datetime | None:
        """The earliest time a sleeper waits for, if any."""
        live = [d for d, n, f in self._sleepers if self._live(n, f)]
        return min(live) if live else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passes."""
        target = self._now + timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not future.done():
                future.set_result(None)
            # Let woken tasks run before time moves on, as it would for real.
            for _ in range(5):
                await asyncio.sleep(0)
        self._now = target
        for _ in range(5):
            await asyncio.sleep(0)
