"""Creating the async engine and bringing the schema up to date."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sagas.ledger.jsontext import json_text, json_value

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Key of the PostgreSQL advisory lock that serialises migrations ("backout").
MIGRATION_LOCK_KEY = 0x6261636B6F7574


# Seconds a SQLite connection waits for another process's write lock.
SQLITE_BUSY_TIMEOUT = 30

# What every ledger engine is built with: JSON columns written by `json_text`
# and read by `json_value`; on SQLite, the busy timeout as well (the async
# engines here, the writer thread's synchronous one in `writer`).
JSON_CODECS: dict[str, Any] = {"json_serializer": json_text, "json_deserializer": json_value}
SQLITE_ENGINE_OPTIONS: dict[str, Any] = {
    "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT},
    **JSON_CODECS,
}


def create_engine(url: str) -> AsyncEngine:
    """An async engine for `url`, tuned for the ledger's access pattern.

    SQLite gets a busy timeout instead of failing at once on a locked file
    (WAL mode is set once per file, by `migrate`). JSON columns are written
    by `json_text` and read by `json_value` (orjson).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(url, **SQLITE_ENGINE_OPTIONS)
        event.listen(engine.sync_engine, "connect", sqlite_pragmas)
        return engine
    return create_async_engine(
        url, pool_size=10, max_overflow=10, pool_pre_ping=True, **JSON_CODECS
    )


# The async drivers the ledger runs on, by SQLAlchemy backend name.
LEDGER_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


def ledger_url(url: str) -> str:
    """`url` with the ledger's async driver, or a ValueError naming what works.

    A URL without a driver (`postgresql://`, `postgres://`, `sqlite:///`) gets
    the async one: the form most tools print would otherwise fail with a
    missing `psycopg2` module, or a dialect called `postgres` that SQLAlchemy
    no longer knows. A driver named explicitly is kept when it is the async
    one and refused otherwise.
    """
    supported = "sqlite+aiosqlite:///path/to/ledger.db or postgresql+asyncpg://user@host/db"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL; expected {supported}") from None
    backend, _, driver = parsed.drivername.partition("+")
    backend = "postgresql" if backend == "postgres" else backend
    wanted = LEDGER_DRIVERS.get(backend)
    if wanted is None:
        raise ValueError(f"the ledger runs on SQLite or PostgreSQL, not {backend!r}: {supported}")
    if driver not in ("", wanted):
        raise ValueError(f"the ledger needs the async driver {backend}+{wanted}, not {driver!r}")
    if parsed.drivername == f"{backend}+{wanted}":
        return url  # as given, character for character
    return parsed.set(drivername=f"{backend}+{wanted}").render_as_string(hide_password=False)


def display_url(url: str) -> str:
    """`url` without its password, for logs and error messages."""
    return make_url(url).render_as_string(hide_password=True)


# Pages of write-ahead log after which a commit copies the log into the
# database file (SQLite's default is 1,000). A rollback's tracker batch dirties
# ~3,000 pages of randomly keyed indexes: at the default every commit copied
# and synced them all again. Measured on a copy of a 100,000-event ledger, a
# batch of 660 confirmations: commit 66 -> 35 ms.
SQLITE_CHECKPOINT_PAGES = 20_000


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Settings of every SQLite connection (a `connect` event listener).

    `synchronous=FULL`: a commit is on disk when it returns (the tracker
    commits its Kafka offsets right after); in WAL mode that is one sync of
    the log per commit. With NORMAL, the commits since the last checkpoint
    could be lost to a power cut, and checkpoints are rare now.
    """
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_CHECKPOINT_PAGES}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


# How long to keep trying to switch a new SQLite file to WAL while other
# processes hold it (the same as the busy timeout).
WAL_SWITCH_TIMEOUT = 30.0


async def use_wal(engine: AsyncEngine, timeout: float = WAL_SWITCH_TIMEOUT) -> None:
    """Put a SQLite file in WAL mode (the CLI and the HTTP API read while the
    worker writes); the mode is stored in the file, so this is done once.

    Not in the connect hook: switching needs the file to itself, and SQLite
    answers "database is locked" at once, without waiting out the busy
    timeout, while another connection holds it (workers started together on
    a new ledger, one of them migrating). The hook runs on the event loop and
    cannot wait without blocking the very connection it waits for; here the
    retries sleep asynchronously.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            async with engine.connect() as connection:
                mode = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar()
                if str(mode).lower() in ("wal", "memory"):
                    return
                await connection.exec_driver_sql("PRAGMA journal_mode=WAL")
                return
        except OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def migrate(engine: AsyncEngine) -> None:
    """Apply every Alembic migration not yet applied (idempotent).

    Workers started together on a new ledger would otherwise all find it
    empty and all create the tables (all but one then crash): a lock is
    taken before Alembic reads the schema version, so each one after the
    first finds the schema up to date.
    """
    if engine.dialect.name == "sqlite":
        await use_wal(engine)
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        elif connection.dialect.name == "sqlite":
            # The write lock, waiting up to the busy timeout; the migration
            # runs in this transaction (SQLite's DDL is transactional).
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
        await connection.run_sync(_upgrade)
