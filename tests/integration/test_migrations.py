"""The Alembic migrations build exactly the schema `sagas.ledger.tables` declares.

The ledger's queries are written against `tables.py`; a migration that
forgets an index (or adds one the tables do not declare) would go unnoticed
until a planner query crawls in production. Checked on SQLite and PostgreSQL,
after upgrading a new database and after a full downgrade and upgrade again.
"""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from sagas.ledger import Ledger
from sagas.ledger.connection import MIGRATIONS_DIR
from sagas.ledger.tables import metadata


def _differences(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


def _down_to_base_and_up_again(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.downgrade(config, "base")
    assert _tables(connection) <= {"alembic_version"}
    command.upgrade(config, "head")


def _tables(connection: Connection) -> set[str]:
    from sqlalchemy import inspect

    return set(inspect(connection).get_table_names())


async def test_migrations_build_the_declared_schema(ledger_url: str) -> None:
    ledger = await Ledger.open(ledger_url)
    try:
        async with ledger.engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
            assert await connection.run_sync(_tables) >= set(metadata.tables)
    finally:
        await ledger.close()


async def test_every_migration_downgrades_and_upgrades_again(ledger_url: str) -> None:
    ledger = await Ledger.open(ledger_url)
    try:
        async with ledger.engine.begin() as connection:
            await connection.run_sync(_down_to_base_and_up_again)
        async with ledger.engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await ledger.close()
