"""The few statements that differ between SQLite and PostgreSQL (upserts)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import func

from sagas.ledger import tables as t


def _insert(conn: AsyncConnection, table: Table) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the ledger supports SQLite and PostgreSQL, not {conn.dialect.name}")


def insert_ignoring_duplicates(conn: AsyncConnection, table: Table, keys: list[str]) -> Any:
    """INSERT ... ON CONFLICT (keys) DO NOTHING, on either backend."""
    return _insert(conn, table).on_conflict_do_nothing(index_elements=keys)


def upsert_deployment(conn: AsyncConnection) -> Any:
    """Insert a deployment or widen its [first, last] event window."""
    statement = _insert(conn, t.deployments)
    least = func.min if conn.dialect.name == "sqlite" else func.least
    greatest = func.max if conn.dialect.name == "sqlite" else func.greatest
    return statement.on_conflict_do_update(
        index_elements=["deployment_id"],
        set_={
            "first_event_at": least(
                t.deployments.c.first_event_at, statement.excluded.first_event_at
            ),
            "last_event_at": greatest(
                t.deployments.c.last_event_at, statement.excluded.last_event_at
            ),
        },
    )


def upsert_offset(conn: AsyncConnection) -> Any:
    """Insert or move forward a (group, topic, partition) offset."""
    statement = _insert(conn, t.tracked_offsets)
    greatest = func.max if conn.dialect.name == "sqlite" else func.greatest
    return statement.on_conflict_do_update(
        index_elements=["group_id", "topic", "partition"],
        set_={"offset": greatest(t.tracked_offsets.c.offset, statement.excluded.offset)},
    )
