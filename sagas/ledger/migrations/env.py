"""Alembic environment: runs on the connection handed in by `sagas.ledger.connection`,
or on `sqlalchemy.url` / `BACKOUT_DATABASE_URL` when called from the alembic CLI."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from sagas.ledger.tables import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_from_url() -> None:
    from sagas.ledger.connection import create_engine, ledger_url

    url = ledger_url(
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("BACKOUT_DATABASE_URL", "sqlite+aiosqlite:///backout.db")
    )

    async def run() -> None:
        engine = create_engine(url)
        async with engine.begin() as connection:
            await connection.run_sync(_run)
        await engine.dispose()

    asyncio.run(run())


connection = config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
elif connection is not None:
    _run(connection)
else:
    _run_from_url()
