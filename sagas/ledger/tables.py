"""The ledger's tables (SQLAlchemy Core). The ledger, not Kafka, is the source of truth."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# Explicit constraint names so Alembic migrations are stable on every backend.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID = String(255)

# Percent of each `compensations` page PostgreSQL fills on insert: the rest
# takes the rows' next versions, so that an update can stay on the page.
COMPENSATIONS_FILLFACTOR = 50


class UtcDateTime(TypeDecorator[datetime]):
    """An aware time, stored as UTC on every backend.

    SQLite's DATETIME keeps the wall-clock fields and drops the offset, so
    14:00+02:00 would be stored, compared and read back as 14:00Z; converting
    to UTC on the way in makes SQLite hold the same instant PostgreSQL does.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            return value.astimezone(UTC)
        return value


Time = UtcDateTime()

deployments = Table(
    "deployments",
    metadata,
    Column("deployment_id", ID, primary_key=True),
    Column("service", ID, nullable=False),
    Column("service_version", ID, nullable=False),
    Column("first_event_at", Time, nullable=False),
    Column("last_event_at", Time, nullable=False),
    Column("first_tracked_at", Time, nullable=False),
    Index(None, "service", "service_version"),
)

events = Table(
    "events",
    metadata,
    Column("event_id", ID, primary_key=True),
    Column("event_type", ID, nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("service", ID, nullable=False),
    Column("service_version", ID, nullable=False),
    Column("deployment_id", ID, nullable=False),
    Column("occurred_at", Time, nullable=False),
    Column("correlation_id", ID),
    Column("causation_id", ID),
    Column("key", ID),
    Column("payload", JSON, nullable=False),
    Column("topic", ID),
    Column("partition", Integer),
    Column("offset", BigInteger),
    Column("traceparent", String(64)),
    Column("tracestate", String(512)),
    Column("tracked_at", Time, nullable=False),
    # The planner's two queries: a deployment's events in a window, and the
    # events caused by a set of events (causation closure, confirmations).
    Index(None, "deployment_id", "occurred_at"),
    Index(None, "causation_id"),
)

rollbacks = Table(
    "rollbacks",
    metadata,
    Column("rollback_id", ID, primary_key=True),
    Column("deployment_id", ID),
    Column("state", String(32), nullable=False),
    Column("dry_run", Boolean, nullable=False, default=False),
    Column("signal", JSON, nullable=False),
    Column("error", Text),
    Column("manual", JSON, nullable=False, default=list),
    Column("uncovered", JSON, nullable=False, default=list),
    # Partition of `backout.rollbacks` the signal came from: the worker that
    # owns that partition owns the rollback (resumes it after a crash).
    Column("signal_partition", Integer),
    Column("quarantine_until", Time),
    # W3C context of the span that received the signal: a resumed rollback's
    # span stays in the same trace.
    Column("traceparent", String(64)),
    Column("tracestate", String(512)),
    Column("created_at", Time, nullable=False),
    Column("updated_at", Time, nullable=False),
    Column("finished_at", Time),
    Index(None, "state"),
    Index(None, "deployment_id"),
)

compensations = Table(
    "compensations",
    metadata,
    # One row per (event, step), shared by every rollback that covers the
    # event: a compensation that is done is never run again.
    Column("idempotency_key", ID, primary_key=True),
    Column("event_id", ID, nullable=False),
    Column("saga", ID, nullable=False),
    Column("step", ID, nullable=False),
    Column("event_type", ID, nullable=False),
    Column("target_version", Integer, nullable=False),
    Column("correlation_id", ID),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("confirm_type", ID),
    Column("confirm_deadline", Time),
    Column("next_attempt_at", Time),
    Column("applied_at", Time),
    Column("confirmed_at", Time),
    # The engine told of the confirmation in memory by the tracker that
    # recorded it (`RollbackEngine.instance_id`): that engine's runs leave
    # these rows out of their polls. Set only with the move to `confirmed`,
    # which is final.
    Column("confirmed_by", ID),
    Column("skip_reason", Text),
    # The rollback whose run claimed it last: on resume, a rollback re-runs
    # only its own interrupted claims (same key, at-least-once).
    Column("claimed_by", ID),
    # Span context of the last attempt, for linking the confirmation span.
    Column("traceparent", String(64)),
    Column("created_at", Time, nullable=False),
    # Every change, the run's own claims and outcomes included (shown to
    # operators). Not indexed, nor is `state`: a run's claims and outcomes
    # then change no indexed column, and PostgreSQL updates the row in place
    # on its page (a HOT update) instead of adding an entry to every index.
    Column("updated_at", Time, nullable=False),
    # Changes a run polls for, made elsewhere: every write but a run's own
    # claims and outcomes (a confirmation, an operator's retry or skip, a
    # plan reopening a failed compensation, an expiry, a block, a release);
    # None until the first. Runs poll "what changed since my last look" on
    # its index; they learn of another rollback's claims when their own
    # claim finds the key taken, and read those keys at each poll after
    # (`RollbackRun._refresh`).
    Column("changed_at", Time),
    Index(None, "event_id"),
    Index(None, "changed_at"),
    # Room on each page for the new versions of its rows (HOT updates).
    postgresql_with={"fillfactor": COMPENSATIONS_FILLFACTOR},
)

rollback_items = Table(
    "rollback_items",
    metadata,
    Column("rollback_id", ID, primary_key=True),
    Column("idempotency_key", ID, primary_key=True),
    Column("position", Integer, nullable=False),
    # Keys of this rollback that must be done before this one may run.
    Column("depends_on", JSON, nullable=False, default=list),
    Column("late", Boolean, nullable=False, default=False),
    Index(None, "idempotency_key"),
    # A run re-reads its plan from the last position it knows (late items).
    Index(None, "rollback_id", "position"),
)

tracked_offsets = Table(
    "tracked_offsets",
    metadata,
    # Written in the same transaction as the events of a batch: the ledger
    # knows exactly which records it holds.
    Column("group_id", ID, primary_key=True),
    Column("topic", ID, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("offset", BigInteger, nullable=False),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("topic", ID, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("error", Text, nullable=False),
    Column("recorded_at", Time, nullable=False),
    Column("replayed_at", Time),
)
