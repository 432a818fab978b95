"""The ledger's faster tracking insert means what the plain one meant.

`EventStore.track` on SQLite reads which ids are stored and inserts the rest
without RETURNING; a race with another writer between the two must fall back
to the exact RETURNING insert (the contract suite covers the rest, on both
backends).
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
    real_insert = tracking_module.insert_ignoring_duplicates
    raced: list[str] = []

    def insert_after_another_writer(conn: Any, table: Any, keys: list[str]) -> Any:
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
        return real_insert(conn, table, keys)

    monkeypatch.setattr(tracking_module, "insert_ignoring_duplicates", insert_after_another_writer)
    result = await ledger.track([_event("x"), _event("y")], now=T0)

    # Our insert stored one row where it expected two: the transaction was
    # rolled back and retried with RETURNING, which reports only "y" as new.
    assert raced == ["x"]
    assert [e.event_id for e in result.new_events] == ["y"]
    assert result.duplicates == 1
    assert await ledger.count_events() == 2
