"""Polling with a deadline, so that tests never sleep and hope."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

_T = TypeVar("_T")


async def wait_for(
    predicate: Callable[[], _T | Awaitable[_T]],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition not met",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> _T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Args:
        predicate: Sync or async callable; truthy means done.
        timeout: Seconds before giving up.
        interval: Seconds between attempts.
        message: What the test was waiting for; starts the failure message.
        ignore: Exception types that count as "not yet" (e.g. ``ConnectionError``
            while a server starts); others propagate at once.

    Returns:
        The predicate's first truthy result.

    Raises:
        AssertionError: The deadline passed; the message names the last result
            or the last ignored exception.

    Example:
        >>> await wait_for(lambda: len(received) == 3, message="3 records")  # doctest: +SKIP
    """
    deadline = time.monotonic() + timeout
    attempts = 0
    last: object = None
    while True:
        attempts += 1
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
        except ignore as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"{message} (timed out after {timeout:g}s, {attempts} attempts; last: {last!r})"
            )
        await asyncio.sleep(min(interval, remaining))
