"""Reading the ledger from outside the worker, cheaply, while it works."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.procs import BenchError, Child, Database
from sagas.ledger import tables as t
from sagas.ledger.records import as_utc

TERMINAL = {"completed", "completed_with_warnings", "failed", "rejected"}


class LedgerProbe:
    """Polls one ledger database (its own connection, never the worker's)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.engine = create_async_engine(db.url)
        # SQLite: `max(rowid)` is O(1) and equals the row count (rows are
        # never deleted, and ON CONFLICT DO NOTHING allocates no rowid).
        # PostgreSQL: count(*), polled less often.
        self.count_sql = text(
            "SELECT coalesce(max(rowid), 0) FROM events"
            if db.kind == "sqlite"
            else "SELECT count(*) FROM events"
        )
        self.interval = 0.02 if db.kind == "sqlite" else 0.1

    async def close(self) -> None:
        await self.engine.dispose()

    async def count_events(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(self.count_sql)).scalar_one())

    async def wait_for_events(self, n: int, child: Child, timeout: float) -> float:
        """Wait until the ledger holds `n` events; the ingest rate in events/s.

        The rate is measured from the first time the ledger is seen non-empty
        to the time it holds `n`: start-up (process start, group join) is left
        out, for the worker and the raw baseline alike.
        """
        started = time.monotonic()
        first: tuple[float, int] | None = None
        while True:
            count = await self.count_events()
            now = time.monotonic()
            if count and first is None:
                first = (now, count)
            if count >= n:
                break
            child.check_alive("the process writing the ledger")
            if now - started > timeout:
                raise BenchError(f"ledger holds {count:,} of {n:,} events after {timeout:g}s")
            await asyncio.sleep(self.interval)
        assert first is not None
        if now > first[0] and n > first[1]:
            return (n - first[1]) / (now - first[0])
        return n / max(now - started, 1e-6)

    async def rollback_state(self, rollback_id: str) -> str | None:
        async with self.engine.connect() as conn:
            state = (
                await conn.execute(
                    select(t.rollbacks.c.state).where(t.rollbacks.c.rollback_id == rollback_id)
                )
            ).scalar()
        return None if state is None else str(state)

    async def wait_terminal(self, rollback_id: str, child: Child, timeout: float) -> str:
        started = time.monotonic()
        while True:
            state = await self.rollback_state(rollback_id)
            if state in TERMINAL:
                return str(state)
            child.check_alive("backout worker")
            if time.monotonic() - started > timeout:
                raise BenchError(f"rollback {rollback_id} still {state} after {timeout:g}s")
            await asyncio.sleep(0.05)

    async def compensation_times(self) -> dict[str, Any]:
        """First and latest applied, latest confirmed times, counts, and
        applied→confirmed round trips."""
        c = t.compensations.c
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(select(c.state, c.applied_at, c.confirmed_at, c.updated_at))
            ).all()
            created = (await conn.execute(select(func.min(t.rollbacks.c.created_at)))).scalar()
        applied: list[datetime] = []
        confirmed: list[datetime] = []
        round_trips: list[float] = []
        states: dict[str, int] = {}
        for state, applied_at, confirmed_at, _ in rows:
            states[state] = states.get(state, 0) + 1
            a, f = as_utc(applied_at), as_utc(confirmed_at)
            if a is not None:
                applied.append(a)
            if f is not None:
                confirmed.append(f)
            if a is not None and f is not None:
                round_trips.append((f - a).total_seconds())
        round_trips.sort()
        return {
            "states": states,
            "first_applied": min(applied) if applied else None,
            "last_applied": max(applied) if applied else None,
            "last_confirmed": max(confirmed) if confirmed else None,
            "created": as_utc(created),
            "round_trip_median": round_trips[len(round_trips) // 2] if round_trips else None,
        }
