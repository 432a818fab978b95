"""The fake clock that executor tests run on: time moves only when told."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sagas.clock import FakeClock


async def test_a_sleeper_wakes_at_the_deadline_it_read_even_if_time_moved_first() -> None:
    # The executor reads the time, then sleeps until a deadline from it; its
    # sleeping task first runs later, and a test may advance the clock in
    # between. Counted from when the task ran, the deadline would be 5 s late.
    clock = FakeClock()
    deadline = clock.now() + timedelta(seconds=10)
    sleeper = asyncio.ensure_future(clock.sleep_until(deadline))

    await clock.advance(5)  # before the sleeper's task has run
    assert not sleeper.done()
    await clock.advance(5)

    assert sleeper.done()
    assert clock.now() == deadline


async def test_a_deadline_already_past_returns_at_once() -> None:
    clock = FakeClock()
    await clock.advance(3)

    await asyncio.wait_for(clock.sleep_until(clock.now() - timedelta(seconds=1)), timeout=1)

    assert clock.sleepers == 0


async def test_sleep_counts_from_the_time_it_is_called() -> None:
    clock = FakeClock()
    await clock.advance(2)
    sleeper = asyncio.ensure_future(clock.sleep(4))
    await asyncio.sleep(0)

    await clock.advance(3.9)
    assert not sleeper.done()
    await clock.advance(0.1)

    assert sleeper.done()
