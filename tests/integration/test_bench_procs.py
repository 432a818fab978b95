"""The benchmark's reading of the PostgreSQL server's CPU time (`bench.procs`).

The rollback rows report the database's CPU per compensation beside the
worker's; it is read from /proc, so it only exists when the server runs on
this machine, as it does for the test suite (127.0.0.1:5432).
"""

from __future__ import annotations

import asyncpg
import pytest

from bench.procs import postgres_cpu_seconds
from tests.support.sync import run_sync


async def _burn(dsn: str) -> None:
    """Work for the server alone: a query that costs it CPU, not us."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.fetchval("SELECT count(*) FROM generate_series(1, 5000000)")
    finally:
        await connection.close()


@pytest.mark.postgres
def test_it_counts_the_cpu_a_connection_used_after_it_closed(postgres_admin_url: str) -> None:
    before = postgres_cpu_seconds()
    assert before is not None, "no postgres process found in /proc"
    # The connection's process exits with the connection: its time is then
    # only in the postmaster's reaped-children counters.
    run_sync(_burn(postgres_admin_url))
    after = postgres_cpu_seconds()
    assert after is not None
    assert after - before >= 0.05, (before, after)
