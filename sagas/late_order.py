"""Late items ordered among the plan they join.

A late event (tracked after its rollback was planned) is planned on its own
(`RollbackEngine._add_late`), and the items planned before know nothing of
it. Yet the ordering rules hold for it too: a late child is undone before
its planned parent, a late later step of a saga instance before the
instance's planned earlier steps, and a late parent after its planned
children. `late_dependencies` finds the planned items a late event is
related to (same saga instance, its cause, what it caused), orders them all
as one plan would (`plan_compensations`), and returns the dependencies that
involve a late item; the run adds them to what it holds in memory.

Two limits. An ignored event is no plan item, so a late event caused by one
is related to the plan through its saga instance (correlation id) only. And
the late items' own dependencies among themselves come from their own plan:
where a planned event's causation contradicts the times of two late ones
(clocks that disagree across services), the two orders can disagree. The
run adds no dependency that would close a cycle (`RollbackRun._wait_for`
keeps the order in place and logs a warning), so the items are not left
waiting for one another.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sagas.ledger import TrackedEvent
from sagas.planner import plan_compensations
from sagas.registry import SagaRegistry


@dataclass(slots=True)
class PlanIndex:
    """A plan's items (idempotency key → event) by what may relate them to a late event."""

    events: dict[str, TrackedEvent] = field(default_factory=dict)
    by_event: dict[str, str] = field(default_factory=dict)
    by_correlation: dict[str, list[str]] = field(default_factory=dict)
    by_cause: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str, event: TrackedEvent) -> None:
        """Index one item (once)."""
        if key in self.events:
            return
        self.events[key] = event
        self.by_event[event.event_id] = key
        if event.correlation_id is not None:
            self.by_correlation.setdefault(event.correlation_id, []).append(key)
        if event.causation_id is not None:
            self.by_cause.setdefault(event.causation_id, []).append(key)

    def related(self, event: TrackedEvent) -> Iterable[str]:
        """Keys of the items in `event`'s saga instance, its cause's, and those it caused."""
        if event.correlation_id is not None:
            yield from self.by_correlation.get(event.correlation_id, ())
        if event.causation_id is not None and event.causation_id in self.by_event:
            yield self.by_event[event.causation_id]
        yield from self.by_cause.get(event.event_id, ())


def late_dependencies(
    late: Sequence[tuple[str, TrackedEvent]], plan: PlanIndex, registry: SagaRegistry
) -> list[tuple[str, str]]:
    """(waiting key, key it waits for) pairs that involve one of the `late` items.

    Args:
        late: the late items' keys and events (they may be in `plan` already).
        plan: the items of the plan they join.
        registry: the loaded sagas (the same resolution as the plan's).
    """
    late_keys = {key for key, _ in late}
    events = dict(late)
    for _, event in late:
        for key in plan.related(event):
            events.setdefault(key, plan.events[key])
    ordered = plan_compensations(list(events.values()), registry)
    return [
        (item.key, dependency)
        for item in ordered.items
        if item.key in events
        for dependency in item.depends_on
        # A key no item holds: the saga module changed since (another step name).
        if dependency in events and (item.key in late_keys or dependency in late_keys)
    ]
