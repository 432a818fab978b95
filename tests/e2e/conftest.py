"""Fixtures of the end-to-end suite: real `backout worker` processes on the session broker.

Starting a worker costs seconds (BROKER.md: group joins are held), so tests
whose data cannot interfere share one worker per module and ledger backend
(`shared_stack`); tests that kill a worker or need other settings start
their own (`make_stack`).
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.stack import Stack, new_stack, stop_stack
from tests.support.worker import READINESS

# ------------------------------------------------------------------ ledger per module


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
    ids=["sqlite", "postgres"],
)
def module_ledger_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`ledger_url` for a module-scoped worker: an empty SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
        return
    # The session fixture checks the server and fails loudly when it is down.
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    from tests.conftest import _throwaway_database  # the root conftest's create/drop

    yield from _throwaway_database(admin_url)


@pytest.fixture(scope="module")
def shared_stack(
    kafka_bootstrap: str, module_ledger_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One worker for the tests of a module whose data cannot interfere.

    Its blast-radius guard is 12 compensations, so a test can exceed it with
    five orders while the others stay below it.
    """
    stack = new_stack(
        kafka_bootstrap,
        module_ledger_url,
        tmp_path_factory.mktemp("workers"),
        {"BACKOUT_MAX_COMPENSATIONS": "12"},
    )
    stack.worker.start_sync()
    try:
        yield stack
    finally:
        stop_stack(stack)


@pytest.fixture
async def make_stack(
    kafka_bootstrap: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """Factory of started workers of one's own: `await make_stack(ledger_url, **env)`."""
    stacks: list[Stack] = []

    async def make(database_url: str, **extra: str) -> Stack:
        stack = await asyncio.to_thread(new_stack, kafka_bootstrap, database_url, tmp_path, extra)
        stacks.append(stack)
        await stack.worker.start()
        return stack

    yield make
    await asyncio.gather(*(asyncio.to_thread(stop_stack, s) for s in stacks))


# ------------------------------------------------------------------ reporting


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How long `backout worker` took to become ready, over this session."""
    if not READINESS:
        return
    times = sorted(READINESS)
    terminalreporter.write_sep("-", "backout worker readiness")
    terminalreporter.write_line(
        f"{len(times)} starts: min {times[0]:.2f}s, median {statistics.median(times):.2f}s, "
        f"max {times[-1]:.2f}s (start to GET /health == 200)"
    )
