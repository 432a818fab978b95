"""Plain records read from and written to the ledger."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, overload

from schemas.envelope import EventEnvelope


class CompensationState(StrEnum):
    """State machine of one compensation (one (event, step), shared by rollbacks).

    pending → running → applied → confirmed; running → pending (retry later);
    running → failed; failed → pending (operator retry) or skipped (operator skip);
    pending → blocked when something it depends on failed, and back.
    """

    PENDING = "pending"
    RUNNING = "running"
    APPLIED = "applied"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    SKIPPED = "skipped"
    BLOCKED = "blocked"


# States in which a compensation no longer holds up the steps after it.
DONE_STATES = frozenset(
    {CompensationState.APPLIED, CompensationState.CONFIRMED, CompensationState.SKIPPED}
)


@overload
def as_utc(value: datetime) -> datetime: ...


@overload
def as_utc(value: None) -> None: ...


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything in the ledger is UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class TrackedEvent:
    """An envelope as the ledger stores it, with where it was read from."""

    event_id: str
    event_type: str
    schema_version: int
    service: str
    service_version: str
    deployment_id: str
    occurred_at: datetime
    payload: dict[str, Any]
    correlation_id: str | None = None
    causation_id: str | None = None
    key: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    traceparent: str | None = None
    tracestate: str | None = None


def tracked_from_envelope(
    envelope: EventEnvelope,
    *,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> TrackedEvent:
    """The ledger form of a validated envelope, with where it was read from."""
    return TrackedEvent(
        event_id=envelope.event_id,
        event_type=envelope.event_type,
        schema_version=envelope.schema_version,
        service=envelope.service,
        service_version=envelope.service_version,
        deployment_id=envelope.deployment_id,
        occurred_at=envelope.occurred_at,
        payload=dict(envelope.payload),
        correlation_id=envelope.correlation_id,
        causation_id=envelope.causation_id,
        key=envelope.key,
        topic=topic,
        partition=partition,
        offset=offset,
        traceparent=traceparent,
        tracestate=tracestate,
    )


def envelope_fields(event: TrackedEvent) -> dict[str, Any]:
    """The envelope fields of a tracked event, in envelope order, not validated.

    Not validated because the dead-letter path must still write an event that
    no longer passes `EventEnvelope` (that may be why its compensation failed).
    """
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "service": event.service,
        "service_version": event.service_version,
        "deployment_id": event.deployment_id,
        "occurred_at": event.occurred_at,
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "key": event.key,
        "payload": event.payload,
    }


def envelope_from_tracked(event: TrackedEvent) -> EventEnvelope:
    """The envelope a tracked event was read as (raises ValueError if it no longer validates)."""
    return EventEnvelope(**envelope_fields(event))


@dataclass(frozen=True, slots=True)
class TrackedOffset:
    """The next offset to read for a (group, topic, partition), stored with its batch."""

    group_id: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class TrackResult:
    """What one tracking batch changed."""

    new_events: list[TrackedEvent]
    duplicates: int
    confirmed_keys: list[str]


@dataclass(frozen=True, slots=True)
class DeploymentSummary:
    """A deployment with its tracked event counts by (type, version)."""

    deployment_id: str
    service: str
    service_version: str
    first_event_at: datetime
    last_event_at: datetime
    events: int
    by_type: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RollbackRecord:
    """A rollback as stored."""

    rollback_id: str
    deployment_id: str | None
    state: str
    dry_run: bool
    signal: dict[str, Any]
    error: str | None
    manual: list[dict[str, Any]]
    uncovered: list[dict[str, Any]]
    signal_partition: int | None
    quarantine_until: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class CompensationRecord:
    """One compensation as part of one rollback's plan."""

    idempotency_key: str
    event_id: str
    saga: str
    step: str
    event_type: str
    target_version: int
    correlation_id: str | None
    state: CompensationState
    attempts: int
    last_error: str | None
    confirm_type: str | None
    confirm_deadline: datetime | None
    next_attempt_at: datetime | None
    skip_reason: str | None
    position: int = 0
    depends_on: tuple[str, ...] = ()
    late: bool = False


@dataclass(frozen=True, slots=True)
class NewCompensation:
    """A planned compensation to insert (ignored if its key already exists)."""

    idempotency_key: str
    event_id: str
    saga: str
    step: str
    event_type: str
    target_version: int
    correlation_id: str | None
    confirm_type: str | None
    position: int
    depends_on: tuple[str, ...]
    late: bool = False


# A compensation of a rollback's plan: as the ledger reads it back, or as
# its engine just stored it (every compensation new: pending, never
# attempted). Building the first from the second took ~3 µs a compensation
# (0.3 s before the run of a 100,000-compensation plan could start).
PlanRecord = CompensationRecord | NewCompensation


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt, written by the executor in batches."""

    idempotency_key: str
    state: CompensationState
    error: str | None = None
    next_attempt_at: datetime | None = None
    confirm_deadline: datetime | None = None
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class Counts:
    """Status counts of a rollback (DESIGN §2.4)."""

    planned: int = 0
    applied: int = 0
    confirmed: int = 0
    failed: int = 0
    skipped: int = 0
    manual: int = 0
    uncovered: int = 0
    late: int = 0
    pending: int = 0
    running: int = 0
    blocked: int = 0

    @classmethod
    def from_states(
        cls, by_state: Mapping[CompensationState, int], *, late: int, manual: int, uncovered: int
    ) -> Counts:
        """Counts from the number of plan items in each state."""
        confirmed = by_state.get(CompensationState.CONFIRMED, 0)
        return cls(
            planned=sum(by_state.values()),
            # `applied` counts every handler that succeeded, confirmed or not.
            applied=by_state.get(CompensationState.APPLIED, 0) + confirmed,
            confirmed=confirmed,
            failed=by_state.get(CompensationState.FAILED, 0),
            skipped=by_state.get(CompensationState.SKIPPED, 0),
            manual=manual,
            uncovered=uncovered,
            late=late,
            pending=by_state.get(CompensationState.PENDING, 0),
            running=by_state.get(CompensationState.RUNNING, 0),
            blocked=by_state.get(CompensationState.BLOCKED, 0),
        )
