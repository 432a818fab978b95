"""The ledger: SQLAlchemy 2 async tables and repository, SQLite or PostgreSQL."""

from __future__ import annotations

from sqlalchemy import text

from sagas.ledger.connection import create_engine, migrate
from sagas.ledger.records import (
    DONE_STATES,
    CompensationRecord,
    CompensationState,
    Counts,
    DeploymentSummary,
    NewCompensation,
    Outcome,
    RollbackRecord,
    TrackedEvent,
    TrackedOffset,
    TrackResult,
)
from sagas.ledger.rollbacks import RollbackStore
from sagas.ledger.tracking import EventStore


class Ledger(EventStore, RollbackStore):
    """The repository over one database.

    Example:
        >>> ledger = await Ledger.open("sqlite+aiosqlite:///backout.db")  # doctest: +SKIP
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)

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

    async def close(self) -> None:
        """Release every connection."""
        await self.engine.dispose()


__all__ = [
    "DONE_STATES",
    "CompensationRecord",
    "CompensationState",
    "Counts",
    "DeploymentSummary",
    "Ledger",
    "NewCompensation",
    "Outcome",
    "RollbackRecord",
    "TrackResult",
    "TrackedEvent",
    "TrackedOffset",
]
