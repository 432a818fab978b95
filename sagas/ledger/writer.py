"""Write transactions that run as one piece, each given as a function of a connection.

A rollback's hot writes (the tracker's batches, the executor's claims and
outcomes, a plan) are a few statements each. Run statement by statement on
the event loop, every statement's result waits for the loop to come round,
and on SQLite the database stays locked meanwhile, while the loop is busy
with hundreds of handlers; the executor's claims and outcomes queue behind.
Measured during a 100,000-event rollback: the tracker's transactions held
the write lock 12.0 s of 21.5 s of execution (117 ms per batch), the
executor's 4.9 s; run whole in the thread, 8.2 s and 4.0 s of 19 s.

So a write is a plain function of a synchronous SQLAlchemy `Connection`.
On a SQLite file it runs whole in one thread of its own, on a connection of
its own, while this process's other writers wait on the same asyncio lock
as `write_transaction`'s. Writes queued while the thread holds that lock
join its turn and run back to back, unless someone else waits for the
lock: handing it back and forth after each write cost a turn of the busy
event loop per write with the database idle (measured at 100,000 events:
the lock held 19.7 s of 28.5 s, of which 6.3 s with no write running).
Elsewhere (PostgreSQL, which locks rows, and an in-memory SQLite database,
which another connection would not see) it runs through
`AsyncConnection.run_sync` in an ordinary transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from sagas.ledger.connection import SQLITE_ENGINE_OPTIONS, sqlite_pragmas
from sagas.ledger.tracking import sqlite_write_lock, write_transaction

T = TypeVar("T")

Write = Callable[[Connection], T]


class LedgerWriter:
    """Runs write transactions for one ledger (see the module's docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        url = engine.url
        self._on_thread = url.get_backend_name() == "sqlite" and url.database not in (
            None,
            "",
            ":memory:",
        )
        self._url = url.set(drivername="sqlite+pysqlite") if self._on_thread else None
        # Created at the first write: a ledger that only reads has no thread.
        self._thread_engine: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        # Writes submitted to the thread and not finished; while any is, the
        # thread holds the write lock (its turn).
        self._queued = 0

    async def run(self, work: Write[T]) -> T:
        """Run `work` in one transaction; its result, or its exception after a rollback."""
        if not self._on_thread:
            async with write_transaction(self.engine) as conn:
                return await conn.run_sync(work)
        turns = sqlite_write_lock(self.engine)
        if self._queued == 0 or turns.waiting:
            # Not the thread's turn, or another writer waits: queue for it.
            await turns.acquire()
        self._queued += 1
        try:
            thread = self._thread or self._start()
            return await asyncio.get_running_loop().run_in_executor(thread, self._in_thread, work)
        finally:
            self._queued -= 1
            if self._queued == 0:
                turns.release()

    def _start(self) -> ThreadPoolExecutor:
        assert self._url is not None
        engine = create_engine(self._url, **SQLITE_ENGINE_OPTIONS)
        event.listen(engine, "connect", sqlite_pragmas)
        self._thread_engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
        return self._thread

    def _in_thread(self, work: Write[T]) -> T:
        assert self._thread_engine is not None
        with self._thread_engine.begin() as conn:
            return work(conn)

    async def close(self) -> None:
        """Let a write in progress finish, then release the thread and its connection."""
        thread, engine = self._thread, self._thread_engine
        self._thread = self._thread_engine = None
        if thread is not None:
            await asyncio.to_thread(thread.shutdown, wait=True)
        if engine is not None:
            engine.dispose()
