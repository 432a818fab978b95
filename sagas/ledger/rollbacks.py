"""Ledger operations on rollbacks, their plans, and the compensation state machine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVarTuple

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Select

from sagas.errors import LedgerError
from sagas.ledger import tables as t
from sagas.ledger.dialect import (
    PreparedInsert,
    insert_ignoring_duplicates,
    recordset_document,
    recordset_insert,
    state_beside_keys,
)
from sagas.ledger.records import (
    CompensationRecord,
    CompensationState,
    Counts,
    NewCompensation,
    Outcome,
    RollbackRecord,
    as_utc,
)
from sagas.ledger.tracking import (
    DOCUMENT_ROWS,
    LOOKUP_CHUNK,
    chunks,
    one_of,
    write_transaction,
)
from sagas.ledger.writer import LedgerWriter
from schemas.dlq import DeadLetter

log = logging.getLogger(__name__)

S = CompensationState
# Plans of at least this many compensations refresh PostgreSQL's statistics.
ANALYZE_AFTER_PLAN = 1000
ACTIVE_ROLLBACK_STATES = ("accepted", "planning", "running", "paused")
_Columns = TypeVarTuple("_Columns")


def rollback_from_row(row: Row[Any]) -> RollbackRecord:
    """Build a `RollbackRecord` from a `rollbacks` row."""
    m = row._mapping
    return RollbackRecord(
        rollback_id=m["rollback_id"],
        deployment_id=m["deployment_id"],
        state=m["state"],
        dry_run=bool(m["dry_run"]),
        signal=m["signal"],
        error=m["error"],
        manual=list(m["manual"] or []),
        uncovered=list(m["uncovered"] or []),
        signal_partition=m["signal_partition"],
        quarantine_until=as_utc(m["quarantine_until"]),
        traceparent=m["traceparent"],
        tracestate=m["tracestate"],
        created_at=as_utc(m["created_at"]),
        updated_at=as_utc(m["updated_at"]),
        finished_at=as_utc(m["finished_at"]),
    )


def compensation_from_row(row: Row[Any]) -> CompensationRecord:
    """Build a `CompensationRecord` from a compensations ⨝ rollback_items row."""
    m = row._mapping
    return CompensationRecord(
        idempotency_key=m["idempotency_key"],
        event_id=m["event_id"],
        saga=m["saga"],
        step=m["step"],
        event_type=m["event_type"],
        target_version=m["target_version"],
        correlation_id=m["correlation_id"],
        state=S(m["state"]),
        attempts=m["attempts"],
        last_error=m["last_error"],
        confirm_type=m["confirm_type"],
        confirm_deadline=as_utc(m["confirm_deadline"]),
        next_attempt_at=as_utc(m["next_attempt_at"]),
        skip_reason=m["skip_reason"],
        position=m.get("position", 0),
        depends_on=tuple(m.get("depends_on") or ()),
        late=bool(m.get("late", False)),
    )


class RollbackStore:
    """Rollbacks, plans and compensation states."""

    engine: AsyncEngine
    writer: LedgerWriter
    # PostgreSQL's ANALYZE after the last large plan, while it runs (see
    # `_analyze_plan_tables`).
    _analyzing: asyncio.Task[None] | None = None

    async def create_rollback(
        self,
        rollback_id: str,
        *,
        signal: dict[str, Any],
        deployment_id: str | None,
        dry_run: bool,
        state: str,
        now: datetime,
        signal_partition: int | None = None,
        error: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> bool:
        """Record a new rollback; False when the id exists (a duplicate signal)."""
        async with write_transaction(self.engine) as conn:
            result = await conn.execute(
                insert_ignoring_duplicates(conn, t.rollbacks, ["rollback_id"]).returning(
                    t.rollbacks.c.rollback_id
                ),
                [
                    {
                        "rollback_id": rollback_id,
                        "deployment_id": deployment_id,
                        "state": state,
                        "dry_run": dry_run,
                        "signal": signal,
                        "error": error,
                        "manual": [],
                        "uncovered": [],
                        "signal_partition": signal_partition,
                        "traceparent": traceparent,
                        "tracestate": tracestate,
                        "created_at": now,
                        "updated_at": now,
                        "finished_at": now if error else None,
                    }
                ],
            )
            return result.first() is not None

    async def get_rollback(self, rollback_id: str) -> RollbackRecord | None:
        """One rollback, or None."""
        row = await self._first(select(t.rollbacks).where(t.rollbacks.c.rollback_id == rollback_id))
        return rollback_from_row(row) if row else None

    async def require_rollback(self, rollback_id: str) -> RollbackRecord:
        """One rollback; `LedgerError` naming the id when unknown."""
        found = await self.get_rollback(rollback_id)
        if found is None:
            raise LedgerError(f"unknown rollback {rollback_id!r}")
        return found

    async def list_rollbacks(self, limit: int = 100) -> list[RollbackRecord]:
        """The most recent rollbacks, newest first."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(t.rollbacks).order_by(t.rollbacks.c.created_at.desc()).limit(limit)
            )
            return [rollback_from_row(r) for r in result.all()]

    async def active_rollbacks(
        self, partitions: Iterable[int] | None = None
    ) -> list[RollbackRecord]:
        """Rollbacks not finished (to resume), optionally only from some signal partitions."""
        query = select(t.rollbacks).where(t.rollbacks.c.state.in_(ACTIVE_ROLLBACK_STATES))
        if partitions is not None:
            query = query.where(t.rollbacks.c.signal_partition.in_(sorted(set(partitions))))
        async with self.engine.connect() as conn:
            result = await conn.execute(query.order_by(t.rollbacks.c.created_at))
            return [rollback_from_row(r) for r in result.all()]

    async def quarantining_rollbacks(
        self, now: datetime, *, planning: bool = False
    ) -> list[RollbackRecord]:
        """Executed rollbacks whose late-event quarantine is still open.

        With `planning`, also the rollbacks being planned (not dry runs): an
        event tracked meanwhile may be missing from the plan being made.
        """
        quarantining = and_(
            t.rollbacks.c.quarantine_until > now,
            t.rollbacks.c.state.not_in(("rejected", "planned", "accepted", "planning")),
        )
        wanted = or_(quarantining, t.rollbacks.c.state == "planning") if planning else quarantining
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(t.rollbacks).where(wanted, t.rollbacks.c.dry_run.is_(False))
            )
            return [rollback_from_row(r) for r in result.all()]

    async def end_quarantine(self, deployment_id: str, *, now: datetime) -> list[str]:
        """The deployment is retired: late events of it are no longer compensated.

        Returns:
            The rollbacks whose quarantine window was closed.
        """
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(t.rollbacks)
                .where(
                    t.rollbacks.c.quarantine_until > now,
                    or_(
                        t.rollbacks.c.deployment_id == deployment_id,
                        t.rollbacks.c.deployment_id.like(f"{deployment_id},%"),
                        t.rollbacks.c.deployment_id.like(f"%,{deployment_id}"),
                        t.rollbacks.c.deployment_id.like(f"%,{deployment_id},%"),
                    ),
                )
                .values(quarantine_until=now, updated_at=now)
                .returning(t.rollbacks.c.rollback_id)
            )
            return list(result.scalars().all())

    async def set_rollback_state(
        self,
        rollback_id: str,
        state: str,
        *,
        now: datetime,
        error: str | None = None,
        finished: bool = False,
        only_from: Sequence[str] | None = None,
    ) -> bool:
        """Move a rollback to `state` (only from `only_from` states when given)."""
        values: dict[str, Any] = {"state": state, "updated_at": now, "error": error}
        if finished:
            values["finished_at"] = now
        query = update(t.rollbacks).where(t.rollbacks.c.rollback_id == rollback_id)
        if only_from is not None:
            query = query.where(t.rollbacks.c.state.in_(only_from))
        async with write_transaction(self.engine) as conn:
            result = await conn.execute(query.values(**values))
            return bool(result.rowcount)

    async def set_deployment_of(self, rollback_id: str, deployment_id: str) -> None:
        """Record which deployment(s) a rollback named by service + version resolved to."""
        async with write_transaction(self.engine) as conn:
            await conn.execute(
                update(t.rollbacks)
                .where(t.rollbacks.c.rollback_id == rollback_id)
                .values(deployment_id=deployment_id)
            )

    async def save_plan(
        self,
        rollback_id: str,
        items: Sequence[NewCompensation],
        *,
        manual: list[dict[str, Any]],
        uncovered: list[dict[str, Any]],
        state: str,
        now: datetime,
        quarantine_until: datetime | None = None,
        planned: int | None = None,
    ) -> list[NewCompensation] | None:
        """Store a plan and move the rollback to `state`, in one transaction.

        Compensations already known (from an earlier rollback of the same
        events) keep their state: done work is never redone. `items` may be
        the last part of a plan stored in parts (`add_items` stored the
        others): `planned` is then the whole plan's size.

        Returns:
            `items` in plan order when every compensation in it was new (so
            the ledger holds exactly what was planned, each pending and never
            attempted: a run can start from it without reading it back); None
            otherwise.
        """

        def store(conn: Connection) -> int:
            inserted = _insert_items(conn, rollback_id, items, now)
            conn.execute(
                update(t.rollbacks)
                .where(t.rollbacks.c.rollback_id == rollback_id)
                .values(
                    manual=manual,
                    uncovered=uncovered,
                    state=state,
                    updated_at=now,
                    quarantine_until=quarantine_until,
                    finished_at=now if state == "planned" else None,
                )
            )
            return inserted

        inserted = await self.writer.run(store)
        self._analyze_if_large(len(items) if planned is None else planned)
        if inserted != len(items):
            return None
        return sorted(items, key=lambda item: item.position)

    def _analyze_if_large(self, planned: int) -> None:
        if planned >= ANALYZE_AFTER_PLAN and self.engine.dialect.name == "postgresql":
            previous = self._analyzing
            self._analyzing = asyncio.ensure_future(self._analyze_after(previous))

    @property
    def refreshing_statistics(self) -> bool:
        """Whether the ANALYZE after a large plan is still running."""
        return self._analyzing is not None and not self._analyzing.done()

    async def statistics_refreshed(self) -> None:
        """Wait for the ANALYZE after the last large plan, if one runs."""
        if self._analyzing is not None:
            await asyncio.wait([self._analyzing])

    async def _analyze_after(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await self._analyze_plan_tables()
        except Exception:  # statistics only: every query stays right without them
            log.warning("ANALYZE after a large plan failed", exc_info=True)

    async def _analyze_plan_tables(self) -> None:
        """Refresh PostgreSQL's statistics of the tables a large plan just grew.

        Without them the planner believes a few rows are pending and, for
        every claim, outcome and confirmation (`key = ANY(...) AND state =
        ...`), ANDs a scan of the whole `state` index with the primary key's;
        autovacuum analyzes only later. Measured, 100,000 events: the
        rollback took 61-65 s without this and 24-28 s with it. ANALYZE reads a
        fixed-size sample (~20-60 ms on a ledger of 10,000-100,000
        compensations), so the plan's run starts meanwhile: its first claims
        may be planned on the old statistics.
        """
        async with self.engine.begin() as conn:
            await conn.exec_driver_sql("ANALYZE compensations")
            await conn.exec_driver_sql("ANALYZE rollback_items")

    async def add_items(
        self,
        rollback_id: str,
        items: Sequence[NewCompensation],
        *,
        now: datetime,
        planned: int | None = None,
    ) -> int:
        """Append items to an existing rollback's plan (late ones, or a part of
        a plan stored in parts, `planned` compensations in all), in one
        transaction; known compensations keep their state, as in `save_plan`.

        Returns:
            How many of the compensations were new.
        """
        inserted = await self.writer.run(lambda conn: _insert_items(conn, rollback_id, items, now))
        if planned is not None:
            self._analyze_if_large(planned)
        return inserted

    async def add_manual(
        self, rollback_id: str, entries: list[dict[str, Any]], *, now: datetime
    ) -> None:
        """Append manual actions or uncovered events found late."""
        if not entries:
            return
        async with write_transaction(self.engine) as conn:
            current = (
                await conn.execute(
                    select(t.rollbacks.c.manual, t.rollbacks.c.uncovered).where(
                        t.rollbacks.c.rollback_id == rollback_id
                    )
                )
            ).one()
            manual = list(current.manual or []) + [e for e in entries if e.get("kind") == "manual"]
            uncovered = list(current.uncovered or []) + [
                e for e in entries if e.get("kind") == "uncovered"
            ]
            await conn.execute(
                update(t.rollbacks)
                .where(t.rollbacks.c.rollback_id == rollback_id)
                .values(manual=manual, uncovered=uncovered, updated_at=now)
            )

    async def plan_items(
        self, rollback_id: str, *, min_position: int = 0
    ) -> list[CompensationRecord]:
        """A rollback's compensations with their current state, in plan order."""
        query = (
            select(
                t.compensations,
                t.rollback_items.c.position,
                t.rollback_items.c.depends_on,
                t.rollback_items.c.late,
            )
            .join(
                t.rollback_items,
                t.rollback_items.c.idempotency_key == t.compensations.c.idempotency_key,
            )
            .where(
                t.rollback_items.c.rollback_id == rollback_id,
                t.rollback_items.c.position >= min_position,
            )
            .order_by(t.rollback_items.c.position)
        )
        async with self.engine.connect() as conn:
            return [compensation_from_row(r) for r in (await conn.execute(query)).all()]

    async def planned_event_ids(self, rollback_id: str, among: Iterable[str]) -> set[str]:
        """Which of the event ids `among` the plan of `rollback_id` covers.

        Costs what `among` holds, not the size of the plan: the tracker asks
        this for every batch while a rollback's quarantine is open.
        """
        ids = sorted(set(among))
        found: set[str] = set()
        query = select(t.compensations.c.event_id).join(t.rollback_items, _in_plan(rollback_id))
        async with self.engine.connect() as conn:
            for part in chunks(ids):
                in_part = one_of(conn, t.compensations.c.event_id, part)
                result = await conn.execute(query.where(in_part))
                found.update(result.scalars().all())
        return found

    async def planned_event_count(self, rollback_id: str) -> int:
        """How many distinct events the plan of `rollback_id` covers."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(func.count(func.distinct(t.compensations.c.event_id))).join(
                    t.rollback_items, _in_plan(rollback_id)
                )
            )
            return int(result.scalar_one())

    async def changed_states(
        self, rollback_id: str, *, since: datetime, known_to: str | None = None
    ) -> list[tuple[str, CompensationState]]:
        """(key, state) of a rollback's compensations changed by someone else since `since`.

        "Someone else": a confirmation or an operator skip (whoever wrote it),
        an operator retry (pending again with a fresh budget), or another
        rollback sharing the key expiring, blocking or releasing its claim.
        Claims and outcomes mark nothing changed (`changed_at`): a run learns
        of another rollback's claim when its own finds the key taken, and
        reads those keys itself at each poll. So a poll reads what changed
        elsewhere, not the run's own progress; confirmations recorded with
        `confirmed_by` = `known_to` (the engine of the run, told of them in
        memory) are left out too. Only two columns are read; the run fetches
        whole records (`get_compensations`) for keys whose state differs from
        what it knows.
        """
        c = t.compensations.c
        query = _changed_elsewhere(
            select(c.idempotency_key, c.state), rollback_id, since, known_to=known_to
        )
        async with self.engine.connect() as conn:
            return [(key, S(state)) for key, state in (await conn.execute(query)).all()]

    async def compensation_states(self, keys: Iterable[str]) -> dict[str, CompensationState]:
        """The current state of each key."""
        c = t.compensations.c
        rows = await self._select_keys(select(c.idempotency_key, c.state), keys)
        return {k: S(s) for k, s in rows}

    async def get_compensations(self, keys: Iterable[str]) -> list[CompensationRecord]:
        """Compensations (without plan position) by key."""
        rows = await self._select_keys(select(t.compensations), keys)
        return [compensation_from_row(r) for r in rows]

    async def compensation_traceparents(self, keys: Iterable[str]) -> dict[str, str]:
        """The span context of each key's last attempt (for linking confirmations)."""
        c = t.compensations.c
        query = select(c.idempotency_key, c.traceparent).where(c.traceparent.is_not(None))
        return dict(await self._select_keys(query, keys))

    async def get_compensation(self, key: str) -> CompensationRecord | None:
        """One compensation (without plan position), or None."""
        row = await self._first(select(t.compensations).where(_is_key(key)))
        return compensation_from_row(row) if row else None

    async def rollbacks_of(self, key: str) -> list[str]:
        """Ids of the rollbacks whose plan holds `key`."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(t.rollback_items.c.rollback_id).where(
                    t.rollback_items.c.idempotency_key == key
                )
            )
            return list(result.scalars().all())

    async def claim(
        self,
        keys: Sequence[str],
        *,
        now: datetime,
        rollback_id: str | None = None,
        outcomes: Sequence[Outcome] = (),
    ) -> list[str]:
        """Record the intent to run: pending → running, attempts + 1, one transaction.

        `outcomes` (of attempts that just finished) are written first, in the
        same transaction: a run claims the work its last outcomes made ready
        in one ledger write per round instead of two.

        Returns:
            The keys actually claimed; a key another executor claimed first, or
            that is done already, is left out.
        """
        write_outcomes = _outcome_writer(outcomes, now)

        def claim(conn: Connection) -> list[str]:
            write_outcomes(conn)
            return _update_keys(
                conn,
                keys,
                state_beside_keys(conn) == S.PENDING,
                state=S.RUNNING,
                attempts=t.compensations.c.attempts + 1,
                claimed_by=rollback_id,
                updated_at=now,
            )

        return await self.writer.run(claim)

    async def record_outcomes(self, outcomes: Sequence[Outcome], *, now: datetime) -> None:
        """Write attempt results in one transaction (see `_outcome_writer`)."""
        if outcomes:
            await self.writer.run(_outcome_writer(outcomes, now))

    async def expire_confirmations(
        self, keys: Sequence[str], *, now: datetime, next_state: CompensationState, error: str
    ) -> list[str]:
        """applied → `next_state` for keys whose confirmation did not arrive in time."""
        return await self.writer.run(
            lambda conn: _update_keys(
                conn,
                keys,
                state_beside_keys(conn) == S.APPLIED,
                state=next_state,
                last_error=error,
                next_attempt_at=now,
                updated_at=now,
                changed_at=now,
            )
        )

    async def set_states(
        self,
        keys: Sequence[str],
        state: CompensationState,
        *,
        now: datetime,
        only_from: Sequence[CompensationState],
        reason: str | None = None,
    ) -> list[str]:
        """Move keys to `state` where they are in one of `only_from`; return those moved."""
        values: dict[str, Any] = {"state": state, "updated_at": now, "changed_at": now}
        if state == S.SKIPPED:
            values["skip_reason"] = reason
        if state == S.PENDING:
            values["next_attempt_at"] = None
        return await self.writer.run(
            lambda conn: _update_keys(
                conn, keys, state_beside_keys(conn).in_(list(only_from)), **values
            )
        )

    async def release_claims(self, rollback_id: str, *, now: datetime) -> list[str]:
        """running → pending for claims of `rollback_id` whose outcome was never recorded.

        Called when a rollback resumes after a crash: the intent was recorded,
        the outcome is unknown, so the handler runs again with the same key.
        Through the rollback's plan (`state` has no index: see the table).
        """
        c = t.compensations.c
        in_plan = select(t.rollback_items.c.idempotency_key).where(
            t.rollback_items.c.rollback_id == rollback_id
        )
        async with write_transaction(self.engine) as conn:
            result = await conn.execute(
                update(t.compensations)
                .where(
                    c.idempotency_key.in_(in_plan),
                    c.claimed_by == rollback_id,
                    c.state == S.RUNNING,
                )
                .values(state=S.PENDING, next_attempt_at=None, updated_at=now, changed_at=now)
                .returning(c.idempotency_key)
            )
            return list(result.scalars().all())

    async def retry_compensation(self, key: str, *, now: datetime) -> None:
        """Operator retry: a failed compensation gets a fresh attempt budget."""
        await self._operator_move(
            key,
            "retry",
            (S.FAILED, S.BLOCKED),
            state=S.PENDING,
            attempts=0,
            next_attempt_at=None,
            updated_at=now,
            changed_at=now,
        )

    async def skip_compensation(self, key: str, *, reason: str, now: datetime) -> None:
        """Operator skip: a compensation that will not be done, with the reason."""
        await self._operator_move(
            key,
            "skip",
            (S.FAILED, S.BLOCKED, S.PENDING),
            state=S.SKIPPED,
            skip_reason=reason,
            updated_at=now,
            changed_at=now,
        )

    async def _operator_move(
        self, key: str, action: str, allowed: Sequence[CompensationState], **values: Any
    ) -> None:
        """Apply `values` to one compensation in an `allowed` state; `LedgerError` if not."""
        async with write_transaction(self.engine) as conn:
            result = await conn.execute(
                update(t.compensations)
                .where(_is_key(key), t.compensations.c.state.in_(list(allowed)))
                .values(**values)
            )
            if not result.rowcount:
                await _explain_refusal(conn, key, action, _either(allowed))

    async def counts(self, rollback_id: str) -> Counts:
        """Status counts of one rollback."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(t.compensations.c.state, t.rollback_items.c.late, func.count())
                    .join(t.rollback_items, _in_plan(rollback_id))
                    .group_by(t.compensations.c.state, t.rollback_items.c.late)
                )
            ).all()
            rollback = (
                await conn.execute(
                    select(t.rollbacks.c.manual, t.rollbacks.c.uncovered).where(
                        t.rollbacks.c.rollback_id == rollback_id
                    )
                )
            ).first()
        by_state: dict[S, int] = {}
        late = 0
        for state, is_late, count in rows:
            by_state[S(state)] = by_state.get(S(state), 0) + count
            late += count if is_late else 0
        return Counts.from_states(
            by_state,
            late=late,
            manual=len(rollback.manual or []) if rollback else 0,
            uncovered=len(rollback.uncovered or []) if rollback else 0,
        )

    async def _first(self, query: Any) -> Row[Any] | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).first()

    async def _select_keys(
        self, query: Select[*_Columns], keys: Iterable[str]
    ) -> list[Row[*_Columns]]:
        """`query` over compensations, for the given keys (in chunks, sorted)."""
        rows: list[Row[*_Columns]] = []
        async with self.engine.connect() as conn:
            for part in chunks(sorted(set(keys))):
                in_part = one_of(conn, t.compensations.c.idempotency_key, part)
                rows.extend((await conn.execute(query.where(in_part))).all())
        return rows

    async def record_dead_letters(self, letters: Sequence[DeadLetter], *, now: datetime) -> None:
        """Keep copies of dead letters' metadata for the status page and `dlq
        list`, in one transaction: a flood of bad records costs one commit per
        batch, not one per record. Reasons are kept to their first 2,000
        characters."""
        if not letters:
            return
        rows = [
            {
                "topic": letter.source_topic,
                "partition": letter.source_partition,
                "offset": letter.source_offset,
                "error": letter.error[:2000],
                "recorded_at": now,
            }
            for letter in letters
        ]
        async with write_transaction(self.engine) as conn:
            await conn.execute(t.dead_letters.insert(), rows)

    async def list_dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent dead letters, newest first."""
        async with self.engine.connect() as conn:
            result = await conn.execute(
                select(t.dead_letters).order_by(t.dead_letters.c.id.desc()).limit(limit)
            )
            return [dict(r._mapping) for r in result.all()]


def _is_key(key: str) -> Any:
    return t.compensations.c.idempotency_key == key


def _in_plan(rollback_id: str) -> Any:
    """Join condition: the `rollback_items` row of a compensation in this rollback's plan."""
    return and_(
        t.rollback_items.c.idempotency_key == t.compensations.c.idempotency_key,
        t.rollback_items.c.rollback_id == rollback_id,
    )


def _insert_items(
    conn: Connection, rollback_id: str, items: Sequence[NewCompensation], now: datetime
) -> int:
    """Insert a plan's compensations (known keys are kept) and items.

    Returns:
        How many compensations were new.
    """
    if not items:
        return 0
    compensation_rows = [
        {
            "idempotency_key": i.idempotency_key,
            "event_id": i.event_id,
            "saga": i.saga,
            "step": i.step,
            "event_type": i.event_type,
            "target_version": i.target_version,
            "correlation_id": i.correlation_id,
            "state": S.PENDING,
            "attempts": 0,
            "confirm_type": i.confirm_type,
            "created_at": now,
            "updated_at": now,
            # No `changed_at`: a run reads its new plan whole, and its polls
            # then need not walk the rows its plan just stored.
        }
        for i in items
    ]
    item_rows = [
        {
            "rollback_id": rollback_id,
            "idempotency_key": i.idempotency_key,
            "position": i.position,
            "depends_on": list(i.depends_on),
            "late": i.late,
        }
        for i in items
    ]
    if conn.dialect.name == "sqlite":
        # One executemany each, rows converted up front (`PreparedInsert`);
        # SQLite counts the rows an executemany inserted.
        compensations = PreparedInsert.of(
            conn, t.compensations, ["idempotency_key"], list(compensation_rows[0])
        )
        inserted = conn.exec_driver_sql(
            compensations.sql, compensations.rows(compensation_rows)
        ).rowcount
        plan = PreparedInsert.of(
            conn, t.rollback_items, ["rollback_id", "idempotency_key"], list(item_rows[0])
        )
        conn.exec_driver_sql(plan.sql, plan.rows(item_rows))
    else:
        # The rows as JSON documents, one statement each (`recordset_insert`).
        compensations_sql = recordset_insert(
            conn,
            t.compensations,
            ["idempotency_key"],
            list(compensation_rows[0]),
            returning="idempotency_key",
        )
        inserted = 0
        for part in chunks(compensation_rows, DOCUMENT_ROWS):
            document = recordset_document(t.compensations, part)
            result = conn.exec_driver_sql(compensations_sql, (document,))
            inserted += len(result.scalars().all())
        plan_sql = recordset_insert(
            conn, t.rollback_items, ["rollback_id", "idempotency_key"], list(item_rows[0])
        )
        for part in chunks(item_rows, DOCUMENT_ROWS):
            conn.exec_driver_sql(plan_sql, (recordset_document(t.rollback_items, part),))
    if inserted == len(items):
        return inserted  # all new: none of them failed before
    # A new plan covering a compensation that failed before is the
    # operator asking again: it gets a fresh attempt budget. Done work
    # (applied/confirmed/skipped) is never touched.
    for part in chunks([i.idempotency_key for i in items], LOOKUP_CHUNK):
        conn.execute(
            update(t.compensations)
            .where(
                one_of(conn, t.compensations.c.idempotency_key, part),
                t.compensations.c.state == S.FAILED,
            )
            .values(
                state=S.PENDING, attempts=0, next_attempt_at=None, updated_at=now, changed_at=now
            )
        )
    return inserted


def _update_keys(
    conn: Connection,
    keys: Sequence[str],
    condition: Any,
    *,
    returning: bool = True,
    **values: Any,
) -> list[str]:
    """Set `values` on those of `keys` that meet `condition` (in chunks).

    Returns:
        The keys changed (an empty list when `returning` is False).
    """
    changed: list[str] = []
    for part in chunks(list(keys)):
        statement = (
            update(t.compensations)
            .where(one_of(conn, t.compensations.c.idempotency_key, part), condition)
            .values(**values)
        )
        if not returning:
            conn.execute(statement)
            continue
        result = conn.execute(statement.returning(t.compensations.c.idempotency_key))
        changed.extend(result.scalars().all())
    return changed


def _outcome_writer(outcomes: Sequence[Outcome], now: datetime) -> Callable[[Connection], None]:
    """The write of attempt results, for a writer transaction.

    An outcome only lands on a compensation still `running`: a confirmation
    that overtook the handler's own result wins. Outcomes with the same
    values (a batch of applied compensations) are written as one `UPDATE
    ... WHERE key IN (...)`: per-row parameter sets cost ~5 µs each in
    SQLAlchemy alone, inside the write transaction.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for o in outcomes:
        values = (o.state, o.error, o.next_attempt_at, o.confirm_deadline, o.traceparent)
        groups.setdefault(values, []).append(o.idempotency_key)
    shared = {v: keys for v, keys in groups.items() if len(keys) >= _SHARED_OUTCOME_GROUP}
    grouped = {key for keys in shared.values() for key in keys}
    single = [o for o in outcomes if o.idempotency_key not in grouped]

    def write(conn: Connection) -> None:
        for (state, error, next_at, deadline, traceparent), keys in shared.items():
            _update_keys(
                conn,
                keys,
                state_beside_keys(conn) == S.RUNNING,
                returning=False,
                **_outcome_values(state, error, next_at, deadline, traceparent, now),
            )
        if single:
            conn.execute(_outcome_statement(now), [_outcome_row(o, now) for o in single])

    return write


# Outcomes sharing their values in groups of at least this many are written
# with one UPDATE per group; smaller groups with one parameter set each.
_SHARED_OUTCOME_GROUP = 8


def _outcome_values(
    state: CompensationState,
    error: str | None,
    next_at: datetime | None,
    deadline: datetime | None,
    traceparent: str | None,
    now: datetime,
) -> dict[str, Any]:
    """The columns an outcome writes (as `_outcome_row` does, for a group)."""
    applied = t.compensations.c.applied_at
    return {
        "state": state,
        "last_error": error,
        "next_attempt_at": next_at,
        "confirm_deadline": deadline,
        "traceparent": traceparent,
        "applied_at": now if state in (S.APPLIED, S.CONFIRMED) else applied,
        "updated_at": now,
    }


def _outcome_statement(now: datetime) -> Any:
    """One UPDATE with a parameter set per outcome (`_outcome_row`)."""
    return (
        update(t.compensations)
        .where(
            t.compensations.c.idempotency_key == bindparam("k"),
            t.compensations.c.state == S.RUNNING,
        )
        .values(
            state=bindparam("new_state"),
            last_error=bindparam("err"),
            next_attempt_at=bindparam("next_at"),
            confirm_deadline=bindparam("deadline"),
            traceparent=bindparam("tp"),
            applied_at=func.coalesce(
                bindparam("applied", type_=t.compensations.c.applied_at.type),
                t.compensations.c.applied_at,
            ),
            updated_at=now,
        )
    )


def _outcome_row(o: Outcome, now: datetime) -> dict[str, Any]:
    return {
        "k": o.idempotency_key,
        "new_state": o.state.value,
        "err": o.error,
        "next_at": o.next_attempt_at,
        "deadline": o.confirm_deadline,
        "applied": now if o.state in (S.APPLIED, S.CONFIRMED) else None,
        "tp": o.traceparent,
    }


def _either(states: Sequence[CompensationState]) -> str:
    """The states an operator action needs, as its refusal words them ("failed or blocked")."""
    names = [str(state) for state in states]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _changed_elsewhere(
    query: Any, rollback_id: str, since: datetime, *, known_to: str | None = None
) -> Any:
    """`query` over a rollback's compensations, narrowed to changes made elsewhere."""
    c = t.compensations.c
    # First, before the plan lookup: at 100,000 events ~10,000 rows changed
    # within a poll's window, nearly all confirmations the run was told of.
    told = [] if known_to is None else [or_(c.confirmed_by.is_(None), c.confirmed_by != known_to)]
    # EXISTS, not a join: SQLite then walks the `changed_at` index (what
    # changed) and probes the plan's primary key, instead of walking the
    # whole plan and probing each compensation (measured: O(plan) per poll).
    in_plan = (
        select(t.rollback_items.c.idempotency_key)
        .where(
            t.rollback_items.c.rollback_id == rollback_id,
            t.rollback_items.c.idempotency_key == c.idempotency_key,
        )
        .exists()
    )
    return query.where(
        c.changed_at >= since,
        *told,
        in_plan,
        or_(
            c.state.in_([S.CONFIRMED, S.SKIPPED]),
            and_(c.claimed_by.is_not(None), c.claimed_by != rollback_id),
            and_(c.state == S.PENDING, c.attempts == 0, c.claimed_by.is_not(None)),
        ),
    )


async def _explain_refusal(conn: Any, key: str, action: str, allowed: str) -> None:
    state = (
        await conn.execute(
            select(t.compensations.c.state).where(t.compensations.c.idempotency_key == key)
        )
    ).scalar()
    if state is None:
        raise LedgerError(f"unknown compensation {key!r}")
    raise LedgerError(f"cannot {action} compensation {key!r}: it is {state}, not {allowed}")
