"""Ledger operations on tracked events and deployments."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import String, any_, func, literal, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sagas.ledger import tables as t
from sagas.ledger.dialect import (
    PreparedInsert,
    insert_ignoring_duplicates,
    recordset_document,
    recordset_insert,
    state_beside_keys,
    upsert_deployment,
)
from sagas.ledger.records import (
    CompensationState,
    DeploymentSummary,
    TrackedEvent,
    TrackedOffset,
    TrackResult,
    as_utc,
)

if TYPE_CHECKING:
    from sagas.ledger.writer import LedgerWriter

# Bound parameter lists stay well under SQLite's and asyncpg's limits.
CHUNK = 500
# One-column IN lists of the tracking path: one query per batch of the
# tracker (2,000 records by default) instead of four; still far under both
# limits (SQLite 32,766 bound values, asyncpg 32,767).
LOOKUP_CHUNK = 5000
# Rows of `events` per multi-row INSERT: 17 columns x 1,000 = 17,000 values.
ROW_CHUNK = 1000
# Rows per JSON document of a PostgreSQL bulk insert (`recordset_insert`):
# a tracker batch is one; a plan of 100,000 compensations ten, so that its
# text (~300 bytes a row) stays a few MB in memory at a time.
DOCUMENT_ROWS = 10_000


class WriteTurns(asyncio.Lock):
    """The lock this process's SQLite writers take turns on; counts who waits.

    The ledger's writer thread keeps it across writes queued back to back
    only while no one else waits (`LedgerWriter`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    async def acquire(self) -> Literal[True]:
        self.waiting += 1
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1


# Per engine and event loop: the lock serialising this process's SQLite writers.
_SQLITE_WRITERS: weakref.WeakKeyDictionary[
    AsyncEngine, dict[asyncio.AbstractEventLoop, WriteTurns]
] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """`engine.begin()`, with this process's SQLite write transactions taking turns.

    SQLite has one writer at a time. Two of our own transactions colliding
    (the tracker's batch and an executor's claim) would otherwise meet in
    SQLite's busy handler, which sleeps in steps of up to 100 ms: measured,
    that made a 10,000-compensation rollback 7 times slower. Waiting on an
    asyncio lock instead hands the database over as soon as it is free.
    Other processes (the CLI, a second worker) still meet the busy timeout.
    PostgreSQL locks rows, not the database: no lock there.
    """
    if engine.dialect.name != "sqlite":
        async with engine.begin() as conn:
            yield conn
        return
    async with sqlite_write_lock(engine), engine.begin() as conn:
        yield conn


def sqlite_write_lock(engine: AsyncEngine) -> WriteTurns:
    """The lock this process's writers of a SQLite `engine` take turns on."""
    locks = _SQLITE_WRITERS.setdefault(engine, {})
    loop = asyncio.get_running_loop()
    lock = locks.get(loop)
    if lock is None:
        for stale in [known for known in locks if known.is_closed()]:
            del locks[stale]
        lock = locks[loop] = WriteTurns()
    return lock


_CONFIRMABLE = [
    CompensationState.PENDING,
    CompensationState.RUNNING,
    CompensationState.APPLIED,
    CompensationState.FAILED,
    CompensationState.BLOCKED,
]


def one_of(conn: Connection | AsyncConnection, column: Any, values: Sequence[str]) -> Any:
    """`column IN (values)`; on PostgreSQL `column = ANY(array)`, same meaning.

    asyncpg prepares a statement per distinct IN-list length, and the lists
    of the tracking path differ in length from batch to batch (measured for
    1,500 keys: 5-7 ms with IN, 0.6-1.2 ms with one array parameter).
    """
    if conn.dialect.name == "postgresql":
        return column == any_(literal(list(values), ARRAY(String())))
    return column.in_(values)


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    """Split `items` into slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


# `TrackedEvent`'s fields picked from a whole `events` row by position: a
# plan reads every event of its blast radius, and looking each of 16 values
# up by name cost ~2 us a row. Every field is a column of the same name (a
# field without one fails here, at import).
_FIELDS = [field.name for field in fields(TrackedEvent)]
_pick_fields = operator.itemgetter(*(list(t.events.c.keys()).index(name) for name in _FIELDS))
_OCCURRED_AT = _FIELDS.index("occurred_at")


def event_from_row(row: Sequence[Any]) -> TrackedEvent:
    """Build a `TrackedEvent` from a whole `events` row (`select(t.events)`)."""
    values = list(_pick_fields(row))
    values[_OCCURRED_AT] = as_utc(values[_OCCURRED_AT])
    return TrackedEvent(*values)


class EventStore:
    """Tracking: events, deployments, confirmations."""

    engine: AsyncEngine
    writer: LedgerWriter
    # Whether the last batch held events stored already. Until one does, a
    # SQLite batch is inserted without first reading which of its ids are
    # stored (~11 ms per 1,300 events, in a process bound by its CPU); a
    # duplicate then makes the insert store fewer rows than it was given,
    # and the batch is written again, exactly (`_Raced`). Duplicates come
    # in runs (a backlog read again after a restart), so after one the
    # ledger is read first again until a batch has none.
    _duplicates_seen = False

    @functools.cached_property
    def _event_insert(self) -> PreparedInsert:
        return PreparedInsert.of(self.engine, t.events, ["event_id"])

    @functools.cached_property
    def _event_recordset_insert(self) -> str:
        columns = [column.name for column in t.events.c]
        return recordset_insert(self.engine, t.events, ["event_id"], columns, returning="event_id")

    async def track(
        self,
        batch: Sequence[TrackedEvent],
        offsets: Sequence[TrackedOffset] = (),
        *,
        now: datetime,
        confirmed_by: str | None = None,
        retrying: bool = False,
    ) -> TrackResult:
        """Store a batch of events in one transaction, with their source offsets.

        Duplicate `event_id`s (already stored, or twice in the batch) are
        ignored. Events whose `causation_id` is the idempotency key of a
        compensation waiting for exactly that event type confirm it.

        `confirmed_by`: the engine the caller will hand the result to
        (`RollbackEngine.instance_id`), recorded with each confirmation; that
        engine's runs then leave these rows out of their polls. Pass it only
        when the result does reach that engine's `on_tracked`.

        `retrying`: an earlier call with this batch raised, so it may have
        committed unseen (the connection lost at COMMIT). Its events are
        duplicates now; the confirmations it recorded with `confirmed_by`
        are reported again, since that engine's runs do not poll for them.
        """
        unique: dict[str, TrackedEvent] = {}
        for item in batch:
            unique.setdefault(item.event_id, item)
        try:
            return await self._track(
                batch,
                unique,
                offsets,
                now,
                confirmed_by,
                retrying,
                returning=False,
                read_stored=retrying or self._duplicates_seen,
            )
        except _Raced:
            self._duplicates_seen = True
            return await self._track(
                batch, unique, offsets, now, confirmed_by, retrying, returning=True
            )

    async def _track(
        self,
        batch: Sequence[TrackedEvent],
        unique: dict[str, TrackedEvent],
        offsets: Sequence[TrackedOffset],
        now: datetime,
        confirmed_by: str | None,
        retrying: bool,
        *,
        returning: bool,
        read_stored: bool = True,
    ) -> TrackResult:
        plain_insert = self.engine.dialect.name == "sqlite" and not returning
        stored: set[str] = set()
        waiting: dict[str, _Waiting] | None = None
        if self.engine.dialect.name == "sqlite":
            # Read before taking this process's write lock (the executor's
            # claims and outcomes wait on it): which events are stored already
            # (a writer racing us is caught by the insert) and which
            # compensations the batch may confirm (their confirmation type
            # never changes; their state is checked again by the UPDATE).
            async with self.engine.connect() as reader:
                if plain_insert and read_stored:
                    stored = await _stored_event_ids(reader, list(unique))
                    self._duplicates_seen = bool(stored)
                waiting = await reader.run_sync(_confirmation_types, list(unique.values()))

        rows = [_event_row(item, now) for item in unique.values()]
        fresh: list[tuple[Any, ...]] = []
        document: str | None = None
        if self.engine.dialect.name == "postgresql":
            document = recordset_document(t.events, rows)
        if plain_insert:  # converted before the transaction (see `PreparedInsert`)
            fresh = self._event_insert.rows([r for r in rows if r["event_id"] not in stored])

        def store(conn: Connection) -> tuple[list[TrackedEvent], list[str]]:
            nonlocal waiting
            new_ids: set[str] = set()
            if plain_insert:
                new_ids = _insert_new_sqlite(conn, fresh, self._event_insert)
            elif document is not None:
                inserted = conn.exec_driver_sql(self._event_recordset_insert, (document,))
                new_ids = set(inserted.scalars().all())
            else:  # SQLite's exact retry after `_Raced`
                for part in chunks(rows, ROW_CHUNK):
                    result = conn.execute(
                        insert_ignoring_duplicates(conn, t.events, ["event_id"]).returning(
                            t.events.c.event_id
                        ),
                        list(part),
                    )
                    new_ids.update(result.scalars().all())
            new_events = [unique[i] for i in unique if i in new_ids]
            _record_deployments(conn, new_events, now)
            # PostgreSQL reads inside the transaction: no lock to keep short there.
            if waiting is None:
                waiting = _confirmation_types(conn, list(unique.values()))
            confirmed = _confirm(conn, new_events, waiting, now, confirmed_by)
            again: list[str] = []
            if retrying and confirmed_by is not None:
                again = [k for k, w in waiting.items() if w.confirmed_by == confirmed_by]
            if offsets:
                _store_offsets(conn, offsets)
            return new_events, sorted({*confirmed, *again})

        new_events, confirmed = await self.writer.run(store)
        return TrackResult(
            new_events=new_events, duplicates=len(batch) - len(new_events), confirmed_keys=confirmed
        )

    async def get_event(self, event_id: str) -> TrackedEvent | None:
        """One tracked event, or None."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(t.events).where(t.events.c.event_id == event_id))
            ).first()
        return event_from_row(row) if row else None

    async def events_by_id(self, event_ids: Iterable[str]) -> dict[str, TrackedEvent]:
        """Tracked events by id (missing ids are left out)."""
        ids = sorted(set(event_ids))
        found: dict[str, TrackedEvent] = {}
        async with self.engine.connect() as conn:
            for part in chunks(ids):
                in_part = one_of(conn, t.events.c.event_id, part)
                result = await conn.execute(select(t.events).where(in_part))
                found.update({e.event_id: e for e in map(event_from_row, result.all())})
        return found

    async def deployment_ids_for(self, service: str, service_version: str) -> list[str]:
        """The deployments of a service version (usually one)."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(t.deployments.c.deployment_id)
                .where(
                    t.deployments.c.service == service,
                    t.deployments.c.service_version == service_version,
                )
                .order_by(t.deployments.c.first_event_at)
            )
            return list(result.scalars().all())

    async def deployment_events(
        self, deployment_id: str, since: datetime | None = None, until: datetime | None = None
    ) -> list[TrackedEvent]:
        """A deployment's events with `since <= occurred_at <= until`, oldest first."""
        query = select(t.events).where(t.events.c.deployment_id == deployment_id)
        if since is not None:
            query = query.where(t.events.c.occurred_at >= since)
        if until is not None:
            query = query.where(t.events.c.occurred_at <= until)
        async with self.engine.connect() as conn:
            result = await conn.execute(query.order_by(t.events.c.occurred_at, t.events.c.event_id))
            return [event_from_row(r) for r in result.all()]

    async def events_caused_by(self, event_ids: Iterable[str]) -> list[TrackedEvent]:
        """Events whose `causation_id` is one of `event_ids`."""
        ids = sorted(set(event_ids))
        found: list[TrackedEvent] = []
        async with self.engine.connect() as conn:
            for part in chunks(ids, LOOKUP_CHUNK):
                result = await conn.execute(
                    select(t.events).where(one_of(conn, t.events.c.causation_id, part))
                )
                found.extend(event_from_row(r) for r in result.all())
        return found

    async def causal_closure(self, roots: Sequence[TrackedEvent]) -> list[TrackedEvent]:
        """`roots` plus every event they caused, transitively, in any service."""
        seen: dict[str, TrackedEvent] = {e.event_id: e for e in roots}
        frontier = list(seen)
        while frontier:
            children = await self.events_caused_by(frontier)
            frontier = []
            for child in children:
                if child.event_id not in seen:
                    seen[child.event_id] = child
                    frontier.append(child.event_id)
        return list(seen.values())

    async def list_deployments(self) -> list[DeploymentSummary]:
        """Every tracked deployment with event counts by `type vN`, newest first."""
        async with self.engine.connect() as conn:
            deployments = (
                await conn.execute(
                    select(t.deployments).order_by(t.deployments.c.last_event_at.desc())
                )
            ).all()
            counts = (
                await conn.execute(
                    select(
                        t.events.c.deployment_id,
                        t.events.c.event_type,
                        t.events.c.schema_version,
                        func.count(),
                    ).group_by(
                        t.events.c.deployment_id, t.events.c.event_type, t.events.c.schema_version
                    )
                )
            ).all()
        by_deployment: dict[str, dict[str, int]] = {}
        for deployment_id, event_type, version, count in counts:
            by_deployment.setdefault(deployment_id, {})[f"{event_type} v{version}"] = count
        return [
            DeploymentSummary(
                deployment_id=d.deployment_id,
                service=d.service,
                service_version=d.service_version,
                first_event_at=as_utc(d.first_event_at),
                last_event_at=as_utc(d.last_event_at),
                events=sum(by_deployment.get(d.deployment_id, {}).values()),
                by_type=dict(sorted(by_deployment.get(d.deployment_id, {}).items())),
            )
            for d in deployments
        ]

    async def count_events(self) -> int:
        """How many events the ledger holds."""
        async with self.engine.connect() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(t.events))).scalar_one()
            )

    async def tracked_offsets(self, group_id: str) -> dict[tuple[str, int], int]:
        """The next offset to read per (topic, partition) stored for `group_id`."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(
                    t.tracked_offsets.c.topic,
                    t.tracked_offsets.c.partition,
                    t.tracked_offsets.c.offset,
                ).where(t.tracked_offsets.c.group_id == group_id)
            )
            return {(topic, partition): offset for topic, partition, offset in result.all()}


def _record_deployments(
    conn: Connection, new_events: Sequence[TrackedEvent], now: datetime
) -> None:
    spans: dict[str, dict[str, Any]] = {}
    for item in new_events:
        span = spans.get(item.deployment_id)
        if span is None:
            spans[item.deployment_id] = {
                "deployment_id": item.deployment_id,
                "service": item.service,
                "service_version": item.service_version,
                "first_event_at": item.occurred_at,
                "last_event_at": item.occurred_at,
                "first_tracked_at": now,
            }
        else:
            span["first_event_at"] = min(span["first_event_at"], item.occurred_at)
            span["last_event_at"] = max(span["last_event_at"], item.occurred_at)
    if spans:
        # One statement, many parameter sets (one round trip), in id order.
        ordered = sorted(spans.values(), key=lambda s: s["deployment_id"])
        conn.execute(upsert_deployment(conn), ordered)


async def _stored_event_ids(conn: AsyncConnection, ids: Sequence[str]) -> set[str]:
    """Which of `ids` the ledger holds already."""
    stored: set[str] = set()
    query = select(t.events.c.event_id)
    for part in chunks(ids, LOOKUP_CHUNK):
        result = await conn.execute(query.where(one_of(conn, t.events.c.event_id, part)))
        stored.update(result.scalars().all())
    return stored


@dataclass(frozen=True, slots=True)
class _Waiting:
    """What a batch needs to know of a compensation its events were caused by."""

    confirm_type: str | None
    confirmed_by: str | None


def _confirmation_types(conn: Connection, events: Iterable[TrackedEvent]) -> dict[str, _Waiting]:
    """By key, the compensations `events` were caused by.

    By key alone: the UPDATE that confirms checks the state, and with the
    state here as well PostgreSQL also scanned the whole `state` index.
    """
    keys = sorted({str(e.causation_id) for e in events if e.causation_id})
    waiting: dict[str, _Waiting] = {}
    c = t.compensations.c
    for part in chunks(keys, LOOKUP_CHUNK):
        result = conn.execute(
            select(c.idempotency_key, c.confirm_type, c.confirmed_by).where(
                one_of(conn, c.idempotency_key, part)
            )
        )
        waiting.update({key: _Waiting(kind, by) for key, kind, by in result.all()})
    return waiting


def _confirm(
    conn: Connection,
    new_events: Sequence[TrackedEvent],
    waiting: dict[str, _Waiting],
    now: datetime,
    confirmed_by: str | None = None,
) -> list[str]:
    """Confirm the compensations in `waiting` that a new event of their type answers."""
    matching = sorted(
        {
            str(e.causation_id)
            for e in new_events
            if e.causation_id in waiting and waiting[e.causation_id].confirm_type == e.event_type
        }
    )
    confirmed: list[str] = []
    for part in chunks(matching, LOOKUP_CHUNK):
        # The state is checked again here: an operator's skip since the read
        # must not be overwritten, and only what changed is reported.
        result = conn.execute(
            update(t.compensations)
            .where(
                one_of(conn, t.compensations.c.idempotency_key, part),
                state_beside_keys(conn).in_(_CONFIRMABLE),
            )
            .values(
                state=CompensationState.CONFIRMED,
                confirmed_at=now,
                confirmed_by=confirmed_by,
                updated_at=now,
                changed_at=now,
            )
            .returning(t.compensations.c.idempotency_key)
        )
        confirmed.extend(result.scalars().all())
    return sorted(confirmed)


class _Raced(Exception):
    """Another writer stored some of the batch between our read and our insert."""


def _insert_new_sqlite(
    conn: Connection, fresh: list[tuple[Any, ...]], prepared: PreparedInsert
) -> set[str]:
    """Insert `fresh` (rows of events not stored yet); the ids inserted.

    SQLite answers a plain multi-row INSERT (one `executemany`) about 30%
    faster than one with RETURNING (measured: 46,000 vs 35,000 rows/s). The
    ids already stored were read first; the insert still ignores conflicts,
    and if it stored fewer rows than expected, another writer raced us and
    `_Raced` rolls the transaction back for an exact retry with RETURNING.
    """
    if not fresh:
        return set()
    result = conn.exec_driver_sql(prepared.sql, fresh)
    if result.rowcount != len(fresh):
        raise _Raced
    event_id = prepared.columns.index("event_id")
    return {row[event_id] for row in fresh}


def _event_row(item: TrackedEvent, now: datetime) -> dict[str, Any]:
    return {
        "event_id": item.event_id,
        "event_type": item.event_type,
        "schema_version": item.schema_version,
        "service": item.service,
        "service_version": item.service_version,
        "deployment_id": item.deployment_id,
        "occurred_at": item.occurred_at,
        "correlation_id": item.correlation_id,
        "causation_id": item.causation_id,
        "key": item.key,
        "payload": item.payload,
        "topic": item.topic,
        "partition": item.partition,
        "offset": item.offset,
        "traceparent": item.traceparent,
        "tracestate": item.tracestate,
        "tracked_at": now,
    }


def _store_offsets(conn: Connection, offsets: Sequence[TrackedOffset]) -> None:
    from sagas.ledger.dialect import upsert_offset

    latest: dict[tuple[str, str, int], int] = {}
    for o in offsets:
        slot = (o.group_id, o.topic, o.partition)
        latest[slot] = max(latest.get(slot, o.offset), o.offset)
    conn.execute(
        upsert_offset(conn),
        [
            {"group_id": g, "topic": topic, "partition": p, "offset": off}
            for (g, topic, p), off in sorted(latest.items())
        ],
    )
