"""The ledger: SQLAlchemy 2 async tables and repository, SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import inspect, text

from sagas.ledger.connection import create_engine, migrate
from sagas.ledger.records import (
    DONE_STATES,
    CompensationRecord,
    CompensationState,
    Counts,
    DeploymentSummary,
    NewCompensation,
    Outcome,
    PlanRecord,
    RollbackRecord,
    TrackedEvent,
    TrackedOffset,
    TrackResult,
    envelope_fields,
    envelope_from_tracked,
    tracked_from_envelope,
)
from sagas.ledger.rollbacks import RollbackStore
from sagas.ledger.tracking import EventStore
from sagas.ledger.writer import LedgerWriter


class Ledger(EventStore, RollbackStore):
    """The repository over one database.

    Example:
        >>> ledger = await Ledger.open("sqlite+aiosqlite:///backout.db")  # doctest: +SKIP
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.writer = LedgerWriter(self.engine)

    @classmethod
    async def open(cls, url: str, *, migrate_schema: bool = True) -> Ledger:
        """Connect, and bring the schema up to date unless told not to."""
        ledger = cls(url)
        if migrate_schema:
            await migrate(ledger.engine)
        return ledger

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def has_schema(self) -> bool:
        """Whether the database holds a ledger (a worker or `open` has migrated it)."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(lambda sync: inspect(sync).has_table("alembic_version"))

    async def close(self) -> None:
        """Release every connection (after the ANALYZE of a large plan, if one runs)."""
        await self.statistics_refreshed()
        await self.writer.close()
        await self.engine.dispose()


_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])

# Methods that write. Each runs to its end even when its caller is cancelled:
# on SQLite a write cut mid-statement leaves a connection holding the write
# lock until it is garbage-collected, and every other writer then waits out
# the busy timeout (30 s stalls were measured on worker restarts). The caller
# still sees the cancellation; only the transaction is allowed to finish.
WRITE_METHODS = (
    "track",
    "create_rollback",
    "set_rollback_state",
    "set_deployment_of",
    "save_plan",
    "add_items",
    "add_manual",
    "claim",
    "record_outcomes",
    "expire_confirmations",
    "set_states",
    "release_claims",
    "retry_compensation",
    "skip_compensation",
    "record_dead_letters",
    "end_quarantine",
)


def _uncancellable(method: _Method) -> _Method:
    @functools.wraps(method)
    async def shielded(*args: Any, **kwargs: Any) -> Any:
        task = asyncio.ensure_future(method(*args, **kwargs))
        return await asyncio.shield(task)

    return shielded  # type: ignore[return-value]  # same signature, wrapped


for _name in WRITE_METHODS:
    setattr(Ledger, _name, _uncancellable(getattr(Ledger, _name)))


__all__ = [
    "DONE_STATES",
    "CompensationRecord",
    "CompensationState",
    "Counts",
    "DeploymentSummary",
    "Ledger",
    "NewCompensation",
    "Outcome",
    "PlanRecord",
    "RollbackRecord",
    "TrackResult",
    "TrackedEvent",
    "TrackedOffset",
    "envelope_fields",
    "envelope_from_tracked",
    "tracked_from_envelope",
]
