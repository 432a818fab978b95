"""Properties of whole rollbacks over random causal histories (hypothesis).

A history is a random DAG of events across several services and saga
instances: each event may be caused by an earlier one, carries a random
correlation id, and happens strictly after its cause (roots at random times,
so unrelated events tie on time and the saga's step order has to decide).
Part of the history comes from the bad deployment; the rest is only undone
where the bad deployment's events caused it.

Every example runs on a fresh `SagaTestHarness` (its own SQLite ledger and
fake clock) inside its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sagas.context import CompensationContext
from sagas.definition import Saga
from sagas.engine import EngineSettings
from sagas.ledger import CompensationState, Ledger
from sagas.ledger.records import TrackedEvent
from sagas.planner import idempotency_key, plan_compensations
from sagas.registry import SagaRegistry
from sagas.retry import RetryPolicy
from sagas.testing import SagaTestHarness
from schemas.headers import IDEMPOTENCY_KEY_HEADER
from schemas.status import RollbackState

BAD = "bad-2.0"
GOOD = "good-1.0"
DONE = {CompensationState.APPLIED, CompensationState.CONFIRMED}

# (event type, service, how the saga treats it), in the saga's declared order.
TYPES: list[tuple[str, str, str]] = [
    ("OrderPlaced", "orders", "compensate"),
    ("PaymentCaptured", "payments", "compensate"),
    ("StockReserved", "inventory", "compensate"),
    ("ReceiptEmailed", "mail", "manual"),
    ("ParcelShipped", "shipping", "compensate"),
    ("OrderViewed", "orders", "ignore"),
    ("LoyaltyGranted", "loyalty", "unknown"),
]
KIND = {event_type: kind for event_type, _, kind in TYPES}
SERVICE = {event_type: service for event_type, service, _ in TYPES}
# Forward step order: the order of declaration; ignored and unknown types come last.
RANK = {
    event_type: index
    for index, event_type in enumerate(t for t, _, k in TYPES if k in ("compensate", "manual"))
}

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Spec:
    """One generated event."""

    event_id: str
    event_type: str
    correlation_id: str | None
    parent: str | None
    deployment_id: str
    at: int  # seconds after the harness's start
    yields: int  # how often its handler yields to the loop (interleavings)
    flaky: bool  # its handler's first attempt fails

    @property
    def step(self) -> str:
        return f"shop.undo_{self.event_type}"

    @property
    def key(self) -> str:
        return idempotency_key(self.event_id, self.step)

    @property
    def priority(self) -> tuple[int, int, str]:
        return (self.at, RANK.get(self.event_type, 1_000_000), self.event_id)


@st.composite
def histories(draw: st.DrawFn, max_events: int = 12) -> list[Spec]:
    size = draw(st.integers(2, max_events))
    numbers = draw(st.permutations(range(size)))  # ids in no relation to time
    specs: list[Spec] = []
    for index in range(size):
        parent = draw(st.none() | st.integers(0, index - 1)) if index else None
        # A narrow range: unrelated events often share a timestamp.
        at = (
            draw(st.integers(0, 6))
            if parent is None
            else specs[parent].at + draw(st.integers(1, 3))
        )
        specs.append(
            Spec(
                event_id=f"ev-{numbers[index]:02d}",
                event_type=draw(st.sampled_from([t for t, _, _ in TYPES])),
                correlation_id=draw(st.sampled_from([None, "c0", "c1", "c2"])),
                parent=None if parent is None else specs[parent].event_id,
                # The first event makes sure the bad deployment exists.
                deployment_id=BAD if index == 0 else draw(st.sampled_from([BAD, GOOD])),
                at=at,
                yields=draw(st.integers(0, 3)),
                flaky=draw(st.booleans()) and draw(st.booleans()),
            )
        )
    return specs


def blast_radius(specs: list[Spec]) -> list[Spec]:
    """The bad deployment's events and everything they caused, transitively."""
    chosen = {s.event_id for s in specs if s.deployment_id == BAD}
    grew = True
    while grew:
        grew = False
        for spec in specs:
            if spec.parent in chosen and spec.event_id not in chosen:
                chosen.add(spec.event_id)
                grew = True
    return [s for s in specs if s.event_id in chosen]


def ancestors(specs: list[Spec]) -> dict[str, set[str]]:
    by_id = {s.event_id: s for s in specs}
    result: dict[str, set[str]] = {}
    for spec in specs:
        found: set[str] = set()
        parent = spec.parent
        while parent is not None:
            found.add(parent)
            parent = by_id[parent].parent
        result[spec.event_id] = found
    return result


@dataclass
class Shop:
    """A saga over `TYPES` whose handlers record calls and sends."""

    specs: list[Spec]
    flaky: bool = False
    generation: int = 0
    calls: list[tuple[int, str, str]] = field(default_factory=list)  # (generation, key, event)
    on_call: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.by_id = {s.event_id: s for s in self.specs}
        self.saga = Saga("shop")
        retry = RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0.5)
        for event_type, _, kind in TYPES:
            if kind == "compensate":
                self.saga.compensate(event_type, retry=retry)(self._handler(event_type))
            elif kind == "manual":
                self.saga.irreversible(event_type, action=f"fix {event_type} by hand")
            elif kind == "ignore":
                self.saga.ignore(event_type)

    def _handler(self, event_type: str) -> Callable[[Any, CompensationContext], Awaitable[None]]:
        async def handler(payload: Any, ctx: CompensationContext) -> None:
            spec = self.by_id[ctx.envelope.event_id]
            assert ctx.idempotency_key == spec.key
            self.calls.append((self.generation, ctx.idempotency_key, spec.event_id))
            if self.on_call is not None:
                self.on_call()
            for _ in range(spec.yields):
                await asyncio.sleep(0)
            if self.flaky and spec.flaky and ctx.attempt == 1:
                raise ConnectionError(f"{SERVICE[event_type]} is restarting")
            await ctx.send(f"{SERVICE[event_type]}.commands", {"event_id": spec.event_id})
            for _ in range(spec.yields):
                await asyncio.sleep(0)

        handler.__name__ = f"undo_{event_type}"
        return handler

    async def emit(self, harness: SagaTestHarness) -> None:
        start = harness.clock.now()
        envelopes = [
            harness.envelope(
                s.event_type,
                {"n": s.event_id},
                event_id=s.event_id,
                deployment_id=s.deployment_id,
                service=SERVICE[s.event_type],
                correlation_id=s.correlation_id,
                causation_id=s.parent,
                occurred_at=start + timedelta(seconds=s.at),
            )
            for s in self.specs
        ]
        # Tracked in a few batches, in an order unrelated to causation.
        for batch in (envelopes[1::2], envelopes[::2]):
            await harness.emit(*batch)


def expected(specs: list[Spec]) -> tuple[list[Spec], RollbackState]:
    radius = blast_radius(specs)
    compensated = [s for s in radius if KIND[s.event_type] == "compensate"]
    warnings = any(KIND[s.event_type] in ("manual", "unknown") for s in radius)
    state = RollbackState.COMPLETED_WITH_WARNINGS if warnings else RollbackState.COMPLETED
    return compensated, state


def sent_event_ids(harness: SagaTestHarness) -> list[str]:
    return [str(c.json()["event_id"]) for c in harness.sent]


def assert_order(specs: list[Spec], order: list[str]) -> None:
    """Children before parents; within an instance, reverse (time, step, id) order.

    `order` may hold an event more than once (a handler re-run after a crash):
    every send of a child must come before every send of its ancestors.
    """
    first = {e: order.index(e) for e in set(order)}
    last = {e: len(order) - 1 - order[::-1].index(e) for e in set(order)}
    lineage = ancestors(specs)
    for child in first:
        for ancestor in lineage[child] & set(first):
            assert last[child] < first[ancestor], (
                f"{ancestor} was compensated before its descendant {child}: {order}"
            )
    by_id = {s.event_id: s for s in specs}
    for instance in {s.correlation_id for s in specs} - {None}:
        members = [e for e in dict.fromkeys(order) if by_id[e].correlation_id == instance]
        wanted = sorted(members, key=lambda e: by_id[e].priority, reverse=True)
        assert members == wanted, f"instance {instance}: {members}, wanted {wanted}"
        ordered = [e for e in order if by_id[e].correlation_id == instance]
        # Sequential: no event of an instance is sent again after a later one.
        assert ordered == sorted(ordered, key=members.index)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


# ------------------------------------------------------------------- (a) order


@PROPERTY_SETTINGS
@given(specs=histories())
def test_children_before_parents_and_reverse_step_order(specs: list[Spec]) -> None:
    async def scenario() -> None:
        shop = Shop(specs)
        async with SagaTestHarness(shop.saga) as harness:
            await shop.emit(harness)
            record = await harness.rollback(BAD)
            compensated, state = expected(specs)
            event(f"{min(len(compensated), 6)}{'+' if len(compensated) > 5 else ''} compensations")

            assert record.state == state, record.error
            order = sent_event_ids(harness)
            assert sorted(order) == sorted(s.event_id for s in compensated)
            assert_order(specs, order)
            assert harness.keys_sent() == [shop.by_id[e].key for e in order]

    run(scenario)


@PROPERTY_SETTINGS
@given(specs=histories(), data=st.data())
def test_planner_dependencies_are_acyclic_and_follow_causation_even_with_lying_clocks(
    specs: list[Spec], data: st.DataObject
) -> None:
    # Timestamps lie (any order), and some causation links may point forward,
    # which can close cycles.
    ids = [s.event_id for s in specs]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    events: list[TrackedEvent] = []
    for spec in specs:
        parent = data.draw(st.sampled_from([spec.parent, *ids]), label="parent")
        events.append(
            TrackedEvent(
                event_id=spec.event_id,
                event_type=spec.event_type,
                schema_version=1,
                service=SERVICE[spec.event_type],
                service_version="1.0",
                deployment_id=spec.deployment_id,
                occurred_at=start + timedelta(seconds=data.draw(st.integers(0, 5), label="at")),
                payload={},
                correlation_id=spec.correlation_id,
                causation_id=parent,
            )
        )
    plan = plan_compensations(events, SagaRegistry([Shop(specs).saga]))

    position = {item.key: item.position for item in plan.items}
    assert len(position) == len(plan.items)
    for item in plan.items:
        assert all(position[d] < item.position for d in item.depends_on)  # hence acyclic
    # Causation is kept wherever it is not part of a cycle.
    parent_of = {e.event_id: e.causation_id for e in events}
    key_of = {item.event.event_id: item.key for item in plan.items}
    waits = _transitive({item.key: set(item.depends_on) for item in plan.items})
    for event_id in key_of:
        seen: set[str] = set()
        ancestor = parent_of[event_id]
        while ancestor is not None and ancestor in parent_of and ancestor not in seen:
            seen.add(ancestor)
            ancestor = parent_of[ancestor]
        if ancestor is not None and ancestor in seen | {event_id}:
            continue  # on or behind a cycle
        for ancestor in seen & set(key_of):
            assert key_of[event_id] in waits[key_of[ancestor]]


@PROPERTY_SETTINGS
@given(specs=histories(), data=st.data())
def test_late_events_never_leave_a_rollback_waiting_even_with_lying_clocks(
    specs: list[Spec], data: st.DataObject
) -> None:
    """Part of the history is tracked before the signal, the rest while its
    rollback is paused (late, joining planned items not started yet), with
    times in any order: the plan's order and the late items' can disagree,
    and the rollback must still end, each compensation run once."""
    lying = [
        dataclasses.replace(s, at=data.draw(st.integers(0, 5), label="at"), flaky=False)
        for s in specs
    ]
    planned_count = data.draw(st.integers(1, len(lying) - 1), label="planned")

    async def scenario() -> None:
        shop = Shop(lying)
        async with SagaTestHarness(shop.saga, settings=EngineSettings(concurrency=1)) as harness:
            early = Shop(lying[:planned_count])
            await early.emit(harness)
            record = await harness.rollback(BAD, settle=False)
            if record.state == RollbackState.RUNNING:
                await harness.engine.pause(record.rollback_id)
            late = Shop(lying[planned_count:])
            await late.emit(harness)
            if record.state == RollbackState.RUNNING:
                await harness.engine.resume_rollback(record.rollback_id)
            record = await asyncio.wait_for(
                harness.settle(record.rollback_id, max_fake_seconds=3600), timeout=20
            )
            compensated, state = expected(lying)
            event(f"{len(blast_radius(lying[planned_count:]))} late in the radius")

            assert record.state == state, record.error
            order = sent_event_ids(harness)
            assert sorted(order) == sorted(s.event_id for s in compensated)

    run(scenario)


def _transitive(direct: dict[str, set[str]]) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for key in sorted(direct, key=lambda k: len(direct[k])):
        stack, found = list(direct[key]), set()
        while stack:
            current = stack.pop()
            if current not in found:
                found.add(current)
                stack.extend(direct[current])
        result[key] = found
    return result


# -------------------------------------------------------------- (b) exactly once


@PROPERTY_SETTINGS
@given(
    specs=histories(),
    how=st.sampled_from(["same-signal-twice", "two-signals-after", "two-signals-concurrent"]),
)
def test_each_compensation_completes_once_whatever_signals_arrive(
    specs: list[Spec], how: str
) -> None:
    async def scenario() -> None:
        shop = Shop(specs)
        async with SagaTestHarness(shop.saga) as harness:
            await shop.emit(harness)
            engine = harness.engine
            first = harness.signal(BAD)
            if how == "same-signal-twice":
                await engine.handle_signal(first)
                again = await engine.handle_signal(first)
                assert again.rollback_id == first.signal_id
                ids = [first.signal_id]
            elif how == "two-signals-after":
                await engine.handle_signal(first)
                await harness.settle(first.signal_id)
                second = await harness.rollback(BAD)
                ids = [first.signal_id, second.rollback_id]
            else:
                await engine.handle_signal(first)
                second = await engine.handle_signal(harness.signal(BAD))
                ids = [first.signal_id, second.rollback_id]
            records = [await harness.settle(i) for i in ids]

            compensated, state = expected(specs)
            assert [r.state for r in records] == [state] * len(ids)
            keys = [key for _, key, _ in shop.calls]
            assert sorted(keys) == sorted(s.key for s in compensated)  # each exactly once
            assert sorted(harness.keys_sent()) == sorted(keys)
            assert_order(specs, sent_event_ids(harness))
            for rollback_id in ids:
                counts = await harness.ledger.counts(rollback_id)
                assert (counts.planned, counts.applied) == (len(compensated), len(compensated))

    run(scenario)


# ------------------------------------------------------------- (c) crash safety


class WorkerDied(Exception):
    """Raised in place of a ledger call: the worker died just before making it."""


@contextlib.contextmanager
def dies_before_ledger_call(
    ledger: Ledger, number: int, *, counts: Callable[[], bool]
) -> Iterator[None]:
    """Let `number` ledger calls through (those for which `counts()` is true), then die.

    A real crash ends the process between two ledger transactions or inside
    one (which the database rolls back): either way, as if the next call never happened.
    """
    made = 0
    names = [
        n
        for n in dir(Ledger)
        if not n.startswith("_") and n != "open" and inspect.iscoroutinefunction(getattr(Ledger, n))
    ]

    def doomed(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal made
            if counts():
                made += 1
                if made > number:
                    raise WorkerDied(f"died before ledger call {made} ({method.__name__})")
            return await method(*args, **kwargs)

        return call

    for name in names:
        setattr(ledger, name, doomed(getattr(ledger, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(ledger, name)


async def _run_until(harness: SagaTestHarness, done: Callable[[], bool]) -> None:
    """Advance the fake clock until `done()` or until no run is left in this process."""
    while not done() and harness.engine.running():
        await asyncio.sleep(0.002)  # real work (SQLite I/O) happens in threads
        if done():
            return
        deadline = harness.clock.next_deadline()
        if deadline is not None:
            await harness.clock.advance(max((deadline - harness.clock.now()).total_seconds(), 0))


Crash = tuple[int, str, int]  # (handler calls before it, "stop" | "die", turns or ledger calls)


@PROPERTY_SETTINGS
@given(
    specs=histories(max_events=10),
    flaky=st.booleans(),
    die_in_signal=st.none() | st.integers(0, 12),
    crashes=st.lists(
        st.tuples(st.integers(0, 12), st.sampled_from(["stop", "die"]), st.integers(0, 8)),
        max_size=3,
    ),
)
def test_crashes_lose_nothing_and_never_redo_recorded_work(
    specs: list[Spec], flaky: bool, die_in_signal: int | None, crashes: list[Crash]
) -> None:
    async def scenario() -> None:
        shop = Shop(specs, flaky=flaky)
        compensated, state = expected(specs)
        keys = [s.key for s in compensated]
        # What the ledger said was done when each generation of workers began:
        # no handler of a later generation may run for it again.
        done_before: dict[int, set[str]] = {0: set()}
        me = asyncio.current_task()

        async with SagaTestHarness(shop.saga) as harness:
            await shop.emit(harness)

            async def restart() -> None:
                await harness.engine.stop()
                states = await harness.ledger.compensation_states(keys)
                shop.generation += 1
                done_before[shop.generation] = {k for k, v in states.items() if v in DONE}
                await harness.crash_and_restart()

            signal = harness.signal(BAD)
            if die_in_signal is not None:
                # The worker dies while accepting or planning the signal.
                with (
                    dies_before_ledger_call(
                        harness.ledger, die_in_signal, counts=lambda: asyncio.current_task() is me
                    ),
                    contextlib.suppress(WorkerDied),
                ):
                    await harness.engine.handle_signal(signal)
                await restart()
            # Kafka redelivers the signal until its offset is committed.
            await harness.engine.handle_signal(signal)

            for calls, how, amount in sorted(crashes):
                await _run_until(harness, lambda: len(shop.calls) >= calls)  # noqa: B023
                if how == "stop":
                    for _ in range(amount):
                        await asyncio.sleep(0)
                else:
                    # The run dies before its `amount`-th next ledger call.
                    with dies_before_ledger_call(
                        harness.ledger, amount, counts=lambda: asyncio.current_task() is not me
                    ):
                        await _run_until(harness, lambda: False)
                await restart()

            record = await harness.settle(signal.signal_id)
            runs = [key for _, key, _ in shop.calls]
            event("a handler ran again" if len(runs) > len(set(runs)) else "no handler ran again")

            assert record.state == state, record.error
            final = await harness.ledger.compensation_states(keys)
            assert final == dict.fromkeys(keys, CompensationState.APPLIED)
            # At least once, always with the same key...
            assert {key for _, key, _ in shop.calls} == set(keys)
            for command in harness.sent:
                spec = shop.by_id[command.json()["event_id"]]
                assert command.header(IDEMPOTENCY_KEY_HEADER) == spec.key
            # ...and never again once its outcome was recorded.
            for generation, key, event_id in shop.calls:
                assert key not in done_before[generation], (
                    f"{event_id} ran again in generation {generation} after it was recorded done"
                )
            assert_order(specs, sent_event_ids(harness))

    run(scenario)
