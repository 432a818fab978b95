"""The ledger's faster tracking insert means what the plain one meant.

`EventStore.track` on SQLite inserts a batch without RETURNING, reading first
which ids are stored only while duplicates come; a duplicate it did not read
(or a race with another writer between the read and the insert) must fall
back to the exact RETURNING insert (the contract suite covers the rest, on
both backends).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sagas.ledger import Ledger, TrackedEvent
from sagas.ledger import tracking as tracking_module

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


def _event(event_id: str, causation_id: str | None = None) -> TrackedEvent:
    return TrackedEvent(
        event_id=event_id,
        event_type="OrderPlaced",
        schema_version=1,
        service="orders",
        service_version="1.0",
        deployment_id="orders-1.0",
        occurred_at=T0,
        payload={"order_id": event_id},
        causation_id=causation_id,
    )


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_batch_reports_exactly_the_new_events(ledger: Ledger) -> None:
    first = await ledger.track([_event("a"), _event("b")], now=T0)
    assert [e.event_id for e in first.new_events] == ["a", "b"]

    again = await ledger.track([_event("b"), _event("c"), _event("c")], now=T0)
    assert [e.event_id for e in again.new_events] == ["c"]
    assert again.duplicates == 2
    assert await ledger.count_events() == 3


async def test_a_race_between_the_read_and_the_insert_falls_back_to_returning(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_insert = tracking_module._insert_new_sqlite
    raced: list[str] = []

    def insert_after_another_writer(conn: Any, fresh: Any, prepared: Any) -> Any:
        if not raced:
            raced.append("x")
            # Another process stores "x" after our read of the stored ids and
            # before our insert: a second connection, committed at once.
            other = sqlite3.connect(ledger.engine.url.database or "", timeout=5)
            try:
                other.execute(
                    "INSERT INTO events (event_id, event_type, schema_version, service, "
                    "service_version, deployment_id, occurred_at, payload, tracked_at) "
                    "VALUES ('x', 'OrderPlaced', 1, 'orders', '1.0', 'orders-1.0', "
                    "'2026-01-31 12:00:00', '{}', '2026-01-31 12:00:00')"
                )
                other.commit()
            finally:
                other.close()
        return real_insert(conn, fresh, prepared)

    monkeypatch.setattr(tracking_module, "_insert_new_sqlite", insert_after_another_writer)
    result = await ledger.track([_event("x"), _event("y")], now=T0)

    # Our insert stored one row where it expected two: the transaction was
    # rolled back and retried with RETURNING, which reports only "y" as new.
    assert raced == ["x"]
    assert [e.event_id for e in result.new_events] == ["y"]
    assert result.duplicates == 1
    assert await ledger.count_events() == 2


async def test_the_stored_ids_are_read_only_once_duplicates_come(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read = tracking_module._stored_event_ids
    reads: list[list[str]] = []

    async def counted(conn: Any, ids: Any) -> set[str]:
        reads.append(list(ids))
        return await real_read(conn, ids)

    monkeypatch.setattr(tracking_module, "_stored_event_ids", counted)
    # New events only: inserted without reading first.
    assert len((await ledger.track([_event("a"), _event("b")], now=T0)).new_events) == 2
    assert len((await ledger.track([_event("c")], now=T0)).new_events) == 1
    assert reads == []
    # A duplicate: the insert stores fewer rows than given, the batch is
    # written again exactly, and the next batch is read first.
    again = await ledger.track([_event("b"), _event("d")], now=T0)
    assert ([e.event_id for e in again.new_events], again.duplicates) == (["d"], 1)
    assert reads == []
    backlog = await ledger.track([_event("a"), _event("e")], now=T0)
    assert ([e.event_id for e in backlog.new_events], backlog.duplicates) == (["e"], 1)
    assert reads == [["a", "e"]]
    # A batch read first that held no duplicate ends the run of reads.
    assert len((await ledger.track([_event("f")], now=T0)).new_events) == 1
    assert len((await ledger.track([_event("g")], now=T0)).new_events) == 1
    assert reads == [["a", "e"], ["f"]]
    assert await ledger.count_events() == 7


def test_a_prepared_insert_stores_what_sqlalchemy_stores(tmp_path: Path) -> None:
    # The tracker converts rows before its transaction (`PreparedInsert`):
    # times with an offset, nested JSON, NULLs and big integers must reach
    # SQLite exactly as SQLAlchemy's own executemany writes them.
    from datetime import timedelta, timezone

    from sqlalchemy import create_engine, select

    from sagas.ledger import tables as t
    from sagas.ledger.dialect import PreparedInsert, insert_ignoring_duplicates

    east = timezone(timedelta(hours=5, minutes=30))
    rows = [
        tracking_module._event_row(
            TrackedEvent(
                event_id=f"e{n}",
                event_type="OrderPlaced",
                schema_version=n + 1,
                service="orders",
                service_version="1.0",
                deployment_id="orders-1.0",
                occurred_at=datetime(2026, 1, 31, 17, 30, n, 123456, tzinfo=east),
                payload={"n": n, "items": [{"sku": "é", "qty": 2**40}], "none": None},
                correlation_id="c" if n else None,
                causation_id=None,
                offset=2**40 + n,
                traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01" if n else None,
            ),
            T0,
        )
        for n in range(3)
    ]
    stored = {}
    for how in ("sqlalchemy", "prepared"):
        engine = create_engine(f"sqlite:///{tmp_path / how}.db")
        t.metadata.create_all(engine)
        with engine.begin() as conn:
            if how == "sqlalchemy":
                conn.execute(insert_ignoring_duplicates(conn, t.events, ["event_id"]), rows)
            else:
                prepared = PreparedInsert.of(conn, t.events, ["event_id"])
                conn.exec_driver_sql(prepared.sql, prepared.rows(rows))
        raw = sqlite3.connect(tmp_path / f"{how}.db")
        stored[how] = raw.execute("SELECT * FROM events ORDER BY event_id").fetchall()
        raw.close()
        with engine.connect() as conn:
            read_back = conn.execute(select(t.events.c.occurred_at)).scalars().all()
        assert [when.hour for when in read_back] == [12, 12, 12]  # 17:30+05:30 is 12:00 UTC
        engine.dispose()
    assert len(stored["prepared"]) == 3
    assert stored["prepared"] == stored["sqlalchemy"]
