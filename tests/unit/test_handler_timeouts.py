"""`HandlerTimeouts`: one timer per batch of attempts, and whose cancellation is whose.

Real asyncio tasks and timers; the executor's own timeout tests
(test_executor.py, `TestFailureIsolation`) run it through whole rollbacks.
"""

from __future__ import annotations

import asyncio

import pytest

from sagas.handler_timeouts import HandlerTimeouts


async def _attempt(timeouts: HandlerTimeouts, hang: asyncio.Event, ran: list[str]) -> str:
    """What an executor attempt does with a cancellation: its own timeout is an outcome."""
    ran.append("started")
    try:
        await hang.wait()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        assert current is not None
        if not timeouts.timed_out(current):
            raise
        return "timed out"
    return "done"


async def test_the_attempts_still_running_at_the_deadline_time_out_and_the_others_do_not() -> None:
    timeouts = HandlerTimeouts()
    ran: list[str] = []
    quick, slow = asyncio.Event(), asyncio.Event()
    fast_one = asyncio.create_task(_attempt(timeouts, quick, ran))
    slow_one = asyncio.create_task(_attempt(timeouts, slow, ran))
    timeouts.watch([fast_one, slow_one], 0.05)
    quick.set()

    assert await asyncio.wait_for(fast_one, 5) == "done"
    assert timeouts.finished(fast_one) is False
    assert await asyncio.wait_for(slow_one, 5) == "timed out"
    assert timeouts.finished(slow_one) is False  # it recorded its own outcome
    # The cancellation was taken back: the task is not left "cancelling".
    assert slow_one.cancelling() == 0


async def test_an_attempt_cancelled_before_it_first_ran_is_told_at_collection() -> None:
    timeouts = HandlerTimeouts()
    ran: list[str] = []
    attempt = asyncio.create_task(_attempt(timeouts, asyncio.Event(), ran))
    timeouts.watch([attempt], 60)
    timeouts._expire({attempt})  # the timer fired before the task's first step

    await asyncio.wait({attempt}, timeout=5)
    assert attempt.cancelled()
    assert ran == []
    assert timeouts.finished(attempt) is True


async def test_a_stop_that_comes_with_the_timeout_is_not_taken_back() -> None:
    timeouts = HandlerTimeouts()
    attempt = asyncio.create_task(_attempt(timeouts, asyncio.Event(), []))
    timeouts.watch([attempt], 60)
    await asyncio.sleep(0)  # in the handler
    timeouts._expire({attempt})
    attempt.cancel()  # the run stops at the same moment

    await asyncio.wait({attempt}, timeout=5)
    assert attempt.cancelled()
    with pytest.raises(asyncio.CancelledError):
        attempt.result()


async def test_a_stop_alone_is_never_a_timeout() -> None:
    timeouts = HandlerTimeouts()
    attempt = asyncio.create_task(_attempt(timeouts, asyncio.Event(), []))
    timeouts.watch([attempt], 60)
    await asyncio.sleep(0)
    attempt.cancel()

    await asyncio.wait({attempt}, timeout=5)
    assert attempt.cancelled()
    assert timeouts.finished(attempt) is False


async def test_a_batch_timer_is_cancelled_once_its_last_attempt_finished() -> None:
    timeouts = HandlerTimeouts()
    done = asyncio.Event()
    done.set()
    attempts = [asyncio.create_task(_attempt(timeouts, done, [])) for _ in range(3)]
    timeouts.watch(attempts, 60)
    ((_, timer),) = {id(b): (b, t) for b, t in timeouts._batch_of.values()}.values()

    await asyncio.gather(*attempts)
    for attempt in attempts[:2]:
        timeouts.finished(attempt)
    assert not timer.cancelled()
    timeouts.finished(attempts[2])
    assert timer.cancelled()
    assert timeouts._batch_of == {}


async def test_close_cancels_the_timers_left() -> None:
    timeouts = HandlerTimeouts()
    attempt = asyncio.create_task(_attempt(timeouts, asyncio.Event(), []))
    timeouts.watch([attempt], 60)
    ((_, timer),) = timeouts._batch_of.values()

    timeouts.close()
    assert timer.cancelled()
    attempt.cancel()
    await asyncio.wait({attempt}, timeout=5)
