"""Fixtures shared by every test suite: a real Kafka broker and real databases.

Missing infrastructure fails the tests loudly: a skipped integration test
would hide exactly the breakage these suites exist to catch.

Fixtures:
    kafka_bootstrap: session broker's ``host:port`` (Tansu, memory storage).
    postgres_admin_url: asyncpg DSN of the PostgreSQL maintenance database.
    postgres_database: SQLAlchemy async URL of a database shared by the session.
    fresh_pg_url: SQLAlchemy async URL of an empty database for one test.
    sqlite_url: SQLAlchemy async URL of an empty SQLite file for one test.
    ledger_url: ``sqlite_url`` and ``fresh_pg_url`` in turn (parametrized).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.engine import make_url

from consumers.broker import BrokerError, EmbeddedBroker
from tests.support.sync import run_sync

PG_DSN_ENV = "BACKOUT_TEST_PG_DSN"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BROKER_START_TIMEOUT = 60.0  # generous: CI machines have 2 cores shared with the suite


# --------------------------------------------------------------------------- Kafka


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start one embedded broker for the session; yield its ``host:port``.

    Topics, groups and offsets persist for the whole session: use
    ``tests.support.names.unique_name`` for every topic and group.
    """
    log_path = tmp_path_factory.mktemp("kafka") / "tansu.log"
    broker = EmbeddedBroker(log_path=log_path)
    error: BrokerError | None = None
    try:
        broker.start(timeout=BROKER_START_TIMEOUT)
    except BrokerError as exc:
        error = exc
    # Failed outside the except block so the report shows only our message.
    if error is not None:
        pytest.fail(f"could not start the embedded Kafka broker (Tansu): {error}", pytrace=False)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


# ------------------------------------------------------------------------ PostgreSQL


def _admin_dsn() -> str:
    return os.environ.get(PG_DSN_ENV) or DEFAULT_PG_DSN


def _dsn_for(admin_dsn: str, database: str, driver: str) -> str:
    """Return ``admin_dsn`` pointing at ``database`` with the given driver name."""
    url = make_url(admin_dsn).set(drivername=driver, database=database)
    return url.render_as_string(hide_password=False)


async def _check_postgres(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


async def _create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        # Identifiers cannot be bound as parameters; `name` is our own hex.
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str, name: str, timeout: float = 30.0) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        deadline = time.monotonic() + timeout
        while True:
            # Engines a test forgot to dispose would block the drop: end them.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                return
            except asyncpg.ObjectInUseError:
                # Terminated backends take a moment to exit; retry to a deadline.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await conn.close()


def _throwaway_database(admin_dsn: str) -> Iterator[str]:
    """Create an empty database, yield its SQLAlchemy async URL, drop it."""
    name = f"backout_test_{uuid.uuid4().hex}"
    run_sync(_create_database(admin_dsn, name))
    try:
        yield _dsn_for(admin_dsn, name, "postgresql+asyncpg")
    finally:
        run_sync(_drop_database(admin_dsn, name))


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """Return the asyncpg DSN of PostgreSQL's maintenance database.

    Default ``postgresql://postgres@127.0.0.1:5432/postgres`` (trust auth);
    override with ``BACKOUT_TEST_PG_DSN``. Fails the test when unreachable.
    """
    dsn = _admin_dsn()
    error: Exception | None = None
    try:
        run_sync(_check_postgres(dsn))
    except Exception as exc:  # whatever the cause, report it and fail
        error = exc
    if error is not None:
        pytest.fail(
            f"PostgreSQL is not reachable at {make_url(dsn)!r} ({error!r}). Start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
            f"or point {PG_DSN_ENV} at a server.",
            pytrace=False,
        )
    return dsn


@pytest.fixture(scope="session")
def postgres_database(postgres_admin_url: str) -> Iterator[str]:
    """Yield ``postgresql+asyncpg://...`` of a throwaway database for the session."""
    yield from _throwaway_database(postgres_admin_url)


@pytest.fixture
def fresh_pg_url(postgres_admin_url: str) -> Iterator[str]:
    """Yield ``postgresql+asyncpg://...`` of an empty database, dropped after the test."""
    yield from _throwaway_database(postgres_admin_url)


# ---------------------------------------------------------------------------- ledger


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """Return ``sqlite+aiosqlite:///<tmp_path>/ledger.db`` (file not yet created)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
    ids=["sqlite", "postgres"],
)
def ledger_url(request: pytest.FixtureRequest) -> str:
    """Return an empty database URL of each kind in turn: SQLite, then PostgreSQL.

    Resolved lazily so that the SQLite variant never touches PostgreSQL.
    """
    fixture = "sqlite_url" if request.param == "sqlite" else "fresh_pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


# ---------------------------------------------------------------------------- tracing

# One SDK provider for the whole session (OpenTelemetry allows setting the
# global provider once): every test runs with real spans, and `spans` hands a
# test the finished ones, cleared before it starts.
_SPAN_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_SPAN_EXPORTER))
trace.set_tracer_provider(_PROVIDER)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """The in-memory exporter of finished spans, emptied for this test."""
    _SPAN_EXPORTER.clear()
    return _SPAN_EXPORTER
