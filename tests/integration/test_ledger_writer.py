"""`LedgerWriter`: write transactions given as functions of a connection.

On a SQLite file they run whole in a thread of their own (on its own
connection), taking turns with the process's other writers; on PostgreSQL
through `run_sync`. Either way a transaction is all or nothing, and what it
wrote is what the next reader sees.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from sagas.ledger import Ledger
from sagas.ledger import tables as t
from sagas.ledger.connection import SQLITE_CHECKPOINT_PAGES
from sagas.ledger.tracking import sqlite_write_lock, write_transaction
from sagas.ledger.writer import LedgerWriter
from tests.support.waiting import wait_for


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(ledger_url)
    try:
        yield opened
    finally:
        await opened.close()


def _offset(group: str, offset: int = 1) -> dict[str, object]:
    return {"group_id": group, "topic": "orders", "partition": 0, "offset": offset}


async def _groups(ledger: Ledger) -> list[str]:
    async with ledger.engine.connect() as conn:
        query = select(t.tracked_offsets.c.group_id).order_by(t.tracked_offsets.c.group_id)
        return list((await conn.execute(query)).scalars().all())


class Refused(Exception):
    """Raised by a write half-way through."""


async def test_a_write_that_fails_half_way_leaves_nothing(ledger: Ledger) -> None:
    def half_a_write(conn: Connection) -> None:
        conn.execute(insert(t.tracked_offsets), [_offset("first")])
        raise Refused("the second statement never runs")

    with pytest.raises(Refused):
        await ledger.writer.run(half_a_write)
    assert await _groups(ledger) == []
    # The writer is still usable after a failure.
    await ledger.writer.run(lambda conn: conn.execute(insert(t.tracked_offsets), [_offset("ok")]))
    assert await _groups(ledger) == ["ok"]


async def test_writes_on_the_thread_and_on_the_loop_take_turns(ledger: Ledger) -> None:
    # 30 writes through the writer and 30 through `write_transaction`, all at
    # once: on SQLite no two may be inside a transaction together (they would
    # meet SQLite's busy handler), and none may lose its row.
    inside = 0
    most_inside = 0
    counting = threading.Lock()

    def enter() -> None:
        nonlocal inside, most_inside
        with counting:
            inside += 1
            most_inside = max(most_inside, inside)

    def leave() -> None:
        nonlocal inside
        with counting:
            inside -= 1

    def one_write(n: int) -> Callable[[Connection], None]:
        def write(conn: Connection) -> None:
            enter()
            conn.execute(insert(t.tracked_offsets), [_offset(f"w{n:02}")])
            time.sleep(0.002)  # a transaction that takes a moment
            leave()

        return write

    async def on_the_loop(n: int) -> None:
        async with write_transaction(ledger.engine) as conn:
            enter()
            await conn.execute(insert(t.tracked_offsets), [_offset(f"l{n:02}")])
            await asyncio.sleep(0.002)
            leave()

    await asyncio.gather(
        *(ledger.writer.run(one_write(n)) for n in range(30)), *(on_the_loop(n) for n in range(30))
    )
    groups = await _groups(ledger)
    assert groups == sorted([f"l{n:02}" for n in range(30)] + [f"w{n:02}" for n in range(30)])
    if ledger.engine.dialect.name == "sqlite":
        assert most_inside == 1
    else:  # PostgreSQL locks rows, not the database: writers overlap
        assert most_inside > 1


async def test_writes_queued_for_the_thread_do_not_wait_for_the_event_loop(
    sqlite_url: str,
) -> None:
    # The second write was queued while the first ran: it starts when the
    # first ends, even with the event loop busy (here: blocked) at that time.
    ledger = await Ledger.open(sqlite_url)
    first_may_end, second_started = threading.Event(), threading.Event()

    def first(conn: Connection) -> None:
        conn.execute(insert(t.tracked_offsets), [_offset("first")])
        assert first_may_end.wait(5.0)

    def second(conn: Connection) -> None:
        second_started.set()
        conn.execute(insert(t.tracked_offsets), [_offset("second")])

    try:
        writes = [asyncio.create_task(ledger.writer.run(w)) for w in (first, second)]
        await wait_for(lambda: ledger.writer._queued == 2, message="both writes submitted")
        first_may_end.set()
        # Blocks the event loop: no turn of it until the second write started.
        assert second_started.wait(5.0), "the queued write waited for the event loop"
        await asyncio.gather(*writes)
        assert await _groups(ledger) == ["first", "second"]
    finally:
        await ledger.close()


async def test_a_writer_waiting_on_the_loop_goes_before_later_thread_writes(
    sqlite_url: str,
) -> None:
    # Thread writes join the thread's turn only while no one else waits for
    # the lock: a stream of them cannot starve `write_transaction`.
    ledger = await Ledger.open(sqlite_url)
    first_may_end = threading.Event()
    order: list[str] = []

    def thread_write(name: str) -> Callable[[Connection], None]:
        def write(conn: Connection) -> None:
            order.append(name)
            conn.execute(insert(t.tracked_offsets), [_offset(name)])
            if name == "a":
                assert first_may_end.wait(5.0)

        return write

    async def on_the_loop() -> None:
        async with write_transaction(ledger.engine) as conn:
            order.append("loop")
            await conn.execute(insert(t.tracked_offsets), [_offset("loop")])

    try:
        turns = sqlite_write_lock(ledger.engine)
        tasks = [asyncio.create_task(ledger.writer.run(thread_write(n))) for n in ("a", "b")]
        await wait_for(lambda: ledger.writer._queued == 2, message="a and b submitted")
        tasks.append(asyncio.create_task(on_the_loop()))
        await wait_for(lambda: turns.waiting == 1, message="the loop's writer waits")
        tasks.append(asyncio.create_task(ledger.writer.run(thread_write("c"))))
        await wait_for(lambda: turns.waiting == 2, message="c waits too")
        first_may_end.set()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "loop", "c"]
    finally:
        await ledger.close()


async def test_a_sqlite_file_is_written_from_one_thread_of_its_own(sqlite_url: str) -> None:
    ledger = await Ledger.open(sqlite_url)
    threads: set[str] = set()

    def note_the_thread(conn: Connection) -> None:
        threads.add(threading.current_thread().name)
        conn.execute(insert(t.tracked_offsets), [_offset(f"g{len(threads)}-{time.time_ns()}")])

    try:
        for _ in range(5):
            await ledger.writer.run(note_the_thread)
    finally:
        await ledger.close()
    (name,) = threads
    assert name.startswith("ledger-writer")
    assert name != threading.current_thread().name


async def test_closing_waits_for_a_write_in_progress(sqlite_url: str) -> None:
    ledger = await Ledger.open(sqlite_url)
    started = threading.Event()

    def slow_write(conn: Connection) -> None:
        conn.execute(insert(t.tracked_offsets), [_offset("slow")])
        started.set()
        time.sleep(0.3)  # a long transaction, in the writer's thread

    write = asyncio.create_task(ledger.writer.run(slow_write))
    assert await asyncio.to_thread(started.wait, 5.0)
    await ledger.writer.close()
    await write
    await ledger.close()

    reopened = await Ledger.open(sqlite_url)
    try:
        async with reopened.engine.connect() as conn:
            count = (
                await conn.execute(select(func.count()).select_from(t.tracked_offsets))
            ).scalar()
        assert count == 1
    finally:
        await reopened.close()


async def test_sqlite_connections_sync_each_commit_and_checkpoint_rarely(
    sqlite_url: str,
) -> None:
    # A commit is on disk when it returns (FULL), and the log is copied into
    # the database every SQLITE_CHECKPOINT_PAGES pages, on every connection.
    ledger = await Ledger.open(sqlite_url)

    def settings(conn: Connection) -> tuple[int, int]:
        values = [
            conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("synchronous", "wal_autocheckpoint")
        ]
        return int(values[0]), int(values[1])

    try:
        on_the_writer = await ledger.writer.run(settings)
        async with ledger.engine.connect() as conn:
            on_the_loop = await conn.run_sync(settings)
    finally:
        await ledger.close()
    full = 2
    assert on_the_writer == on_the_loop == (full, SQLITE_CHECKPOINT_PAGES)


def test_only_a_sqlite_file_gets_a_thread() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    cases = {
        "sqlite+aiosqlite:////tmp/ledger.db": True,
        "sqlite+aiosqlite://": False,
        "sqlite+aiosqlite:///:memory:": False,
        "postgresql+asyncpg://postgres@127.0.0.1/backout": False,
    }
    for url, on_thread in cases.items():
        engine = create_async_engine(url)  # no connection is made
        assert LedgerWriter(engine)._on_thread is on_thread, url
