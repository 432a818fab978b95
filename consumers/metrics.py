"""Prometheus metrics (prometheus-client), in one place."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

from sagas.ledger import TrackedEvent

EVENTS_TRACKED = Counter(
    "backout_events_tracked",
    "Domain events written to the ledger.",
    ["service", "event_type", "schema_version"],
)
EVENTS_DUPLICATE = Counter("backout_events_duplicate", "Tracked records already in the ledger.")
EVENTS_INVALID = Counter(
    "backout_events_invalid", "Records dead-lettered by the tracker.", ["topic"]
)
SIGNALS = Counter("backout_signals", "Rollback signals received, by result.", ["result"])
COMPENSATIONS = Counter("backout_compensations", "Compensation attempts by outcome.", ["outcome"])
ROLLBACK_DURATION = Histogram(
    "backout_rollback_duration_seconds",
    "Time from a rollback's signal to its end.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
ROLLBACKS_IN_PROGRESS = Gauge("backout_rollbacks_in_progress", "Rollbacks running in this worker.")
LEDGER_WRITE_SECONDS = Histogram(
    "backout_ledger_write_seconds",
    "Duration of one ledger write transaction (a tracking batch).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
TRACKING_CATCH_UP = Histogram(
    "backout_tracking_catch_up_seconds",
    "A signal's wait for tracking to catch up before its blast radius is read.",
    ["caught_up"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONSUMER_LAG = Gauge(
    "backout_consumer_lag", "Records not yet tracked, per partition.", ["topic", "partition"]
)


def record_tracked(events: Sequence[TrackedEvent], duplicates: int) -> None:
    """Count a tracked batch."""
    counts: dict[tuple[str, str, str], int] = {}
    for event in events:
        label = (event.service, event.event_type, str(event.schema_version))
        counts[label] = counts.get(label, 0) + 1
    for (service, event_type, version), count in counts.items():
        EVENTS_TRACKED.labels(service=service, event_type=event_type, schema_version=version).inc(
            count
        )
    if duplicates:
        EVENTS_DUPLICATE.inc(duplicates)


class PrometheusObserver:
    """The engine's `EngineObserver`, counting into the metrics above."""

    def __init__(self) -> None:
        self._running: set[str] = set()

    def compensation_outcome(self, state: str) -> None:
        """Count one attempt's outcome (`pending` means "failed, will retry")."""
        COMPENSATIONS.labels(outcome="retrying" if state == "pending" else state).inc()

    def rollback_started(self, rollback_id: str) -> None:
        """A run began."""
        self._running.add(rollback_id)
        ROLLBACKS_IN_PROGRESS.set(len(self._running))

    def tracking_caught_up(self, seconds: float, caught_up: bool) -> None:
        """Observe a signal's wait for tracking (`caught_up`: "false" when time ran out)."""
        TRACKING_CATCH_UP.labels(caught_up=str(caught_up).lower()).observe(seconds)

    def rollback_ended(self, rollback_id: str, state: str, seconds: float | None) -> None:
        """A run ended; observe the duration of rollbacks that finished."""
        self._running.discard(rollback_id)
        ROLLBACKS_IN_PROGRESS.set(len(self._running))
        if seconds is not None and state in ("completed", "completed_with_warnings", "failed"):
            ROLLBACK_DURATION.observe(seconds)
