"""`BACKOUT_DATABASE_URL`: the ledger's async drivers filled in, other databases refused."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from consumers.settings import Settings
from sagas.ledger.connection import ledger_url


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("sqlite+aiosqlite:///backout.db", "sqlite+aiosqlite:///backout.db"),
        ("sqlite:///backout.db", "sqlite+aiosqlite:///backout.db"),
        ("postgresql://backout@db:5432/backout", "postgresql+asyncpg://backout@db:5432/backout"),
        # Heroku-style scheme, password with an escaped character, a query.
        (
            "postgres://backout:p%40ss@db/backout?ssl=require",
            "postgresql+asyncpg://backout:p%40ss@db/backout?ssl=require",
        ),
        ("postgresql+asyncpg://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
    ],
)
def test_a_url_gets_the_async_driver(given: str, used: str) -> None:
    assert ledger_url(given) == used
    assert Settings(database_url=given).database_url == used


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("mysql://root@localhost/backout", "runs on SQLite or PostgreSQL, not 'mysql'"),
        ("postgresql+psycopg2://u@h/d", "needs the async driver postgresql+asyncpg"),
        ("sqlite+pysqlite:///x.db", "needs the async driver sqlite+aiosqlite"),
        ("backout.db", "not a database URL"),
    ],
)
def test_other_urls_are_refused_with_what_works(given: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        ledger_url(given)
    with pytest.raises(ValidationError, match="database_url"):
        Settings(database_url=given)
