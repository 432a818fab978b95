"""The few statements that differ between SQLite and PostgreSQL (upserts)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.expression import func

from sagas.ledger import tables as t
from sagas.ledger.jsontext import json_text
from sagas.ledger.records import as_utc

# What a statement is built for: anything that knows its dialect.
Bound = Connection | AsyncConnection | AsyncEngine


def _insert(conn: Bound, table: Table) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the ledger supports SQLite and PostgreSQL, not {conn.dialect.name}")


def insert_ignoring_duplicates(conn: Bound, table: Table, keys: list[str]) -> Any:
    """INSERT ... ON CONFLICT (keys) DO NOTHING, on either backend."""
    return _insert(conn, table).on_conflict_do_nothing(index_elements=keys)


def upsert_deployment(conn: Bound) -> Any:
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


def upsert_offset(conn: Bound) -> Any:
    """Insert or move forward a (group, topic, partition) offset."""
    statement = _insert(conn, t.tracked_offsets)
    greatest = func.max if conn.dialect.name == "sqlite" else func.greatest
    return statement.on_conflict_do_update(
        index_elements=["group_id", "topic", "partition"],
        set_={"offset": greatest(t.tracked_offsets.c.offset, statement.excluded.offset)},
    )


@dataclass(frozen=True)
class PreparedInsert:
    """An INSERT ... ON CONFLICT DO NOTHING compiled once, fed ready-made rows.

    SQLAlchemy converts each value (datetimes to text, JSON to a string) as
    it executes, inside the transaction; rows converted beforehand with the
    same column types let the transaction hold SQLite's write lock only for
    SQLite's own work. Measured for 1,024 event rows: SQLAlchemy's
    executemany 17-33 ms; converting 3 ms, then executing 12-19 ms.
    """

    sql: str
    columns: tuple[str, ...]
    converters: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def of(
        cls, bound: Bound, table: Table, keys: list[str], columns: Sequence[str] | None = None
    ) -> PreparedInsert:
        """The statement for `columns` of `table` (default: all), on `bound`'s dialect."""
        statement = insert_ignoring_duplicates(bound, table, keys)
        names = list(columns) if columns is not None else [c.name for c in table.c]
        compiled = statement.compile(dialect=bound.dialect, column_keys=names)
        columns = tuple(compiled.positiontup or ())
        dialect = bound.dialect
        converters = tuple(
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
        )
        return cls(str(compiled), columns, converters)

    def rows(self, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """`rows` as the driver's parameter tuples, in the statement's order.

        Column by column: a plan's rows share one time object (`created_at`,
        `updated_at`), a tracked batch its `tracked_at`, converted once.
        Measured for a 100,000-compensation plan: 1.75 s converting row by
        row, of which 0.73 s for 200,000 times.
        """
        columns = []
        for name, convert in zip(self.columns, self.converters, strict=True):
            values = [row[name] for row in rows]
            if convert is not None:
                values = _convert_all(convert, values)
            columns.append(values)
        return list(zip(*columns, strict=True))


def _convert_all(convert: Callable[[Any], Any], values: list[Any]) -> list[Any]:
    """`convert` each value; the very same object repeated (a batch's `now`) only once."""
    result = []
    previous: Any = _NOTHING
    converted: Any = None
    for value in values:
        if value is not previous:
            previous, converted = value, convert(value)
        result.append(converted)
    return result


_NOTHING = object()


def recordset_insert(
    bound: Bound,
    table: Table,
    keys: Sequence[str],
    columns: Sequence[str],
    *,
    returning: str | None = None,
) -> str:
    """INSERT a JSON array of rows (`recordset_document`) ON CONFLICT (`keys`)
    DO NOTHING, on PostgreSQL: a whole batch as one statement with one parameter.

    SQLAlchemy would send a multi-row INSERT ... RETURNING as pages of rows
    of VALUES, each value bound and processed in Python one by one (17
    values per tracked event, 12 per planned compensation). Measured, the
    worker's CPU: see docs/benchmarks.md ("What was optimised").
    """
    if bound.dialect.name != "postgresql":
        raise NotImplementedError("json_to_recordset is PostgreSQL's")
    quote = bound.dialect.identifier_preparer.quote
    names, values, fields = [], [], []
    for column in (table.c[name] for name in columns):
        name = quote(column.name)
        sql_type = column.type.compile(dialect=bound.dialect)
        names.append(name)
        if isinstance(column.type, JSON):
            fields.append(f"{name} TEXT")
            values.append(f"CAST(r.{name} AS {sql_type})")
        else:
            fields.append(f"{name} {sql_type}")
            values.append(f"r.{name}")
    conflict = ", ".join(quote(key) for key in keys)
    sql = (
        f"INSERT INTO {quote(table.name)} ({', '.join(names)}) "
        f"SELECT {', '.join(values)} FROM json_to_recordset($1::JSON) AS r({', '.join(fields)}) "
        f"ON CONFLICT ({conflict}) DO NOTHING"
    )
    return f"{sql} RETURNING {quote(returning)}" if returning else sql


def recordset_document(table: Table, rows: Sequence[dict[str, Any]]) -> str:
    """`rows` of `table` as the JSON document `recordset_insert` reads.

    Times become ISO 8601 text in UTC, JSON columns their JSON text (a
    string): PostgreSQL decodes every string of the document it reads, and
    refuses the escape of a lone surrogate there (valid JSON, which a `json`
    column itself keeps). The very same time object repeated (a batch's
    `now`) is converted once. Encoded with orjson (`json_text`).
    """
    if not rows:
        return "[]"
    converters: dict[str, Callable[[Any], Any]] = {}
    for name in rows[0]:
        column_type = table.c[name].type
        if isinstance(column_type, JSON):
            converters[name] = _json_text
        elif isinstance(column_type, t.UtcDateTime):
            converters[name] = _utc_text
    converted_rows = [dict(row) for row in rows]
    for name, convert in converters.items():
        values = _convert_all(convert, [row[name] for row in converted_rows])
        for row, value in zip(converted_rows, values, strict=True):
            row[name] = value
    return json_text(converted_rows)


def _json_text(value: Any) -> str | None:
    """A JSON column's value as its JSON text; SQL NULL stays NULL."""
    return None if value is None else json_text(value)


def _utc_text(value: datetime | None) -> str | None:
    """ISO 8601 in UTC (a naive time is taken as UTC, as everywhere in the ledger)."""
    return None if value is None else as_utc(value).isoformat()


def state_beside_keys(conn: Bound) -> Any:
    """`compensations.state` for a WHERE that also names the keys.

    SQLite has no statistics on a fresh ledger and, for `key IN (...) AND
    state = ?`, prefers the `state` index, walking every pending row of every
    plan for each claim (measured: a 100,000-compensation rollback 4 times
    slower per compensation than a 10,000 one). `state || ''` is the same
    value without the index, so the primary key serves the lookup.
    PostgreSQL gets the plain column: it ANDs the `state` index with the
    primary key there (a scan of 30,000 index entries at 10,000
    compensations), yet with the expression instead a 100,000-event
    rollback took 122 s rather than ~64 s (one run). The tracker's
    confirmations use it too: with the plain column, SQLite took ~38 ms to
    confirm 1,024 compensations of a 100,000-compensation plan, with the
    expression ~7 ms.
    """
    state = t.compensations.c.state
    return state.concat("") if conn.dialect.name == "sqlite" else state
