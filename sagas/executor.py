"""Runs one rollback's plan until every compensation is done, failed or blocked.

The executor records intent before calling a handler (`claim`: pending →
running, in one transaction for a whole batch) and the outcome after (one
transaction per batch of finished attempts), so a crash at any point leaves
the ledger saying exactly what may have happened: `running` means "maybe",
and is re-run with the same idempotency key when the rollback resumes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from sagas import tracing
from sagas.clock import Clock
from sagas.context import CommandSink, CompensationContext
from sagas.definition import CompensationStep
from sagas.errors import CompensationError, PermanentError, UpcastError
from sagas.handler_timeouts import HandlerTimeouts
from sagas.late_order import PlanIndex, late_dependencies
from sagas.ledger import (
    DONE_STATES,
    Counts,
    Ledger,
    NewCompensation,
    Outcome,
    PlanRecord,
    TrackedEvent,
    envelope_from_tracked,
)
from sagas.ledger import CompensationState as S
from sagas.registry import Compensate, SagaRegistry

log = logging.getLogger(__name__)

# No ledger write moves a compensation out of these states, so neither does a
# run: a confirmation told while a claim, an outcome or an expiry was being
# written stands, whatever that write returns (the poll would not correct it:
# it leaves out what this run's engine was told of).
FINAL_STATES = frozenset({S.CONFIRMED, S.SKIPPED})


class FailureSink(Protocol):
    """Told about every compensation that exhausted its retries (→ DLQ)."""

    async def compensation_failed(
        self, rollback_id: str, item: PlanRecord, event: TrackedEvent, error: str
    ) -> None:
        """Record the failure somewhere an operator looks."""


@dataclass(slots=True)
class _Item:
    record: PlanRecord
    step: CompensationStep
    state: S
    attempts: int
    next_attempt_at: datetime | None
    confirm_deadline: datetime | None
    dependents: list[str] = field(default_factory=list)
    waiting_on: int = 0
    # Dependencies found after the plan was stored, between late items and
    # the planned ones they relate to (`late_order`); None for nearly all.
    extra: list[str] | None = None

    def depends_on(self) -> Iterator[str]:
        yield from self.record.depends_on
        if self.extra is not None:
            yield from self.extra

    @property
    def key(self) -> str:
        return self.record.idempotency_key


class PlanParts:
    """How much of a plan stored in parts is in the ledger yet.

    A large plan's run starts once its first part is stored, while its
    engine stores the rest: items from position `stored_up_to` on cannot be
    claimed yet (there is no row to claim). `stale` are keys the engine found
    known already while storing (an earlier rollback's compensations): only
    the ledger knows their state, which the run reads once everything is in.
    `started` is set once the run has made its first claim (or found
    nothing it could claim yet).
    """

    def __init__(self, stored_up_to: int) -> None:
        self.stored_up_to = stored_up_to
        self.complete = False
        self.stale: list[str] = []
        self.started = asyncio.Event()

    def stored(self, up_to: int | None, stale: Iterable[str] = ()) -> None:
        """Items before position `up_to` are stored, all of them when None
        (`stale`: found known)."""
        if up_to is None:
            self.complete = True
        else:
            self.stored_up_to = max(self.stored_up_to, up_to)
        self.stale.extend(stale)


@dataclass(frozen=True, slots=True)
class KnownPlan:
    """What a run may take as read from the ledger, as its engine just wrote it."""

    events: Mapping[str, TrackedEvent]  # tracked events by id
    # The plan as stored, in order, when every compensation in it was new.
    items: Sequence[NewCompensation] | None = None
    parts: PlanParts | None = None  # set while `items` are still being stored


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run of a rollback ended."""

    finished: bool  # every compensation done (applied/confirmed/skipped)
    failed: list[str]  # keys failed (the rollback waits for an operator)
    paused: bool
    stopped: bool = False  # told to stop (shutdown, rebalance): another run resumes it


class RollbackRun:
    """One execution of one rollback's plan.

    Args:
        rollback_id: the rollback.
        deployment_id: the deployment it undoes (passed to handlers).
        ledger, registry, sink, clock: the engine's dependencies.
        concurrency: compensations in flight at once (across instances).
        failures: told about exhausted compensations.
        on_progress: called after every batch of state changes.
        is_paused: async callable telling whether an operator paused the rollback.
        poll_interval: seconds between checks of the ledger for confirmations
            recorded by other workers and for operator actions.
        known: what the engine just wrote when it planned the rollback (the
            plan's events, and the plan as stored if every compensation in
            it was new); the run reads only the rest from the ledger.
        engine_id: the id its engine's tracker records with the confirmations
            it tells this run of through `confirmed()` (`confirmed_by`); the
            run's poll leaves those out. None: the poll reads them all.
    """

    def __init__(
        self,
        rollback_id: str,
        deployment_id: str,
        *,
        ledger: Ledger,
        registry: SagaRegistry,
        sink: CommandSink,
        clock: Clock,
        concurrency: int = 64,
        failures: FailureSink | None = None,
        on_progress: Callable[[], Any] | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
        is_paused: Callable[[], Any] | None = None,
        poll_interval: float = 0.5,
        rng: random.Random | None = None,
        known: KnownPlan | None = None,
        engine_id: str | None = None,
    ) -> None:
        self.rollback_id = rollback_id
        self.deployment_id = deployment_id
        self.ledger = ledger
        self.registry = registry
        self.sink = sink
        self.clock = clock
        self.concurrency = max(1, concurrency)
        self.failures = failures
        self.on_progress = on_progress
        self.on_outcome = on_outcome
        self.is_paused = is_paused
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()
        self.engine_id = engine_id
        self._items: dict[str, _Item] = {}
        # Resolved once per (event type, version, step name), not per item.
        self._steps: dict[tuple[str, int, str], CompensationStep] = {}
        self._events: dict[str, TrackedEvent] = dict(known.events) if known else {}
        self._stored_plan = list(known.items or []) if known else []
        self._parts = known.parts if known else None
        self._wake = asyncio.Event()
        # Set by `wake()`: re-read the ledger at the next turn of the loop. A
        # confirmation tracked in this process only wakes the loop: it is
        # applied in memory already, and re-reading the ledger after every
        # tracked batch would cost a query per batch.
        self._reload = False
        # Confirmations told while the plan is read: an item being read may
        # show a state from before one, and the poll leaves it out.
        self._loading = False
        self._confirmed_while_loading: set[str] = set()
        self._inflight: dict[asyncio.Task[Outcome], str] = {}
        self._timeouts = HandlerTimeouts()
        self._running_here: set[str] = set()
        # Keys another rollback's run has claimed (found `running` in the
        # ledger, not claimed here): its outcome does not mark the row as
        # changed for polls (`changed_at`), so each poll reads them by key.
        self._elsewhere: set[str] = set()
        # Keys whose dependencies are done and that are pending; the heap
        # orders them by plan position and may hold stale entries.
        self._ready: set[str] = set()
        self._ready_heap: list[tuple[int, str]] = []
        # Built when the first late item arrives (`_order_late`).
        self._plan_index: PlanIndex | None = None
        # Keys of late items told of before they are read (`expect_late`) →
        # the items already waiting for them.
        self._awaited: dict[str, list[str]] = {}
        self._next_position = 0
        # Blocking is re-derived only after a failure appears or goes away.
        self._blocking_changed = True
        # Items still to be finished or confirmed (pending, running, applied
        # awaiting a confirmation): the run ends when none is left.
        self._open = 0
        # Plan items by state, and late ones: progress without a ledger query
        # (counting a 100,000-item plan in the ledger took ~180 ms).
        self._by_state: Counter[S] = Counter()
        self._late = 0
        # (deadline, key) of retries and confirmation timeouts; may hold stale
        # entries, checked against the item when popped.
        self._deadlines: list[tuple[datetime, str]] = []
        self._last_refresh: datetime | None = None
        self._check_pause = True
        self._stopping = False
        # True while the run only waits for time or a wake-up: nothing of its
        # own is in flight (the test harness advances a fake clock only then).
        self.idle = False

    def wake(self) -> None:
        """Re-check the ledger now (new confirmations, late items, operator action)."""
        self._reload = True
        self._wake.set()

    def plan_stored(self) -> None:
        """More of a plan stored in parts is in the ledger (see `PlanParts`)."""
        self._wake.set()

    def stop(self) -> None:
        """End the run at its next safe point, between two ledger transactions.

        Cancelling the run's task instead could cut a ledger transaction in
        half, and on SQLite a write cancelled mid-statement keeps the database
        locked for every other connection. Handlers still in flight are
        cancelled (they touch no ledger); their claims stay `running` and are
        re-run, with the same key, when the rollback resumes.
        """
        self._stopping = True
        self._wake.set()

    def confirmed(self, keys: list[str]) -> None:
        """Confirmations tracked in this process: apply without a ledger round trip.

        Every confirmation its tracker records with this run's `engine_id`
        must arrive here: the poll does not read those back.
        """
        if self._loading:
            self._confirmed_while_loading.update(keys)
        if self._apply_confirmed(keys):
            self._wake.set()

    def _apply_confirmed(self, keys: Iterable[str]) -> bool:
        hit = False
        for key in keys:
            item = self._items.get(key)
            if item is not None and item.state not in (S.CONFIRMED, S.SKIPPED):
                self._set_state(item, S.CONFIRMED)
                hit = True
        return hit

    def counts(self, *, manual: int, uncovered: int) -> Counts:
        """The plan's counts as this run knows them (the ledger's, as of its last poll)."""
        return Counts.from_states(
            self._by_state, late=self._late, manual=manual, uncovered=uncovered
        )

    async def run(self) -> RunResult:
        """Run until nothing is left to do now; see `RunResult`."""
        await self.ledger.release_claims(self.rollback_id, now=self.clock.now())
        await self._load()
        try:
            return await self._loop()
        finally:
            for task in self._inflight:
                task.cancel()
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
            self._timeouts.close()

    async def _load(self) -> None:
        """Read new plan items (late events) and states changed outside this run."""
        self._loading = True
        try:
            await self._read_plan()
            # A confirmation committed after an item's state was read: told
            # while reading, so applied now (confirmed is final).
            self._apply_confirmed(self._confirmed_while_loading)
        finally:
            self._loading = False
            self._confirmed_while_loading.clear()

    async def _read_plan(self) -> None:
        stored, self._stored_plan = self._stored_plan, []
        after = max((r.position + 1 for r in stored), default=self._next_position)
        fresh: list[PlanRecord] = [*stored]
        fresh += await self.ledger.plan_items(self.rollback_id, min_position=after)
        fresh = [r for r in fresh if r.idempotency_key not in self._items]
        missing_events = {r.event_id for r in fresh if r.event_id not in self._events}
        if missing_events:
            self._events.update(await self.ledger.events_by_id(missing_events))
        for record in fresh:
            self._next_position = max(self._next_position, record.position + 1)
            if isinstance(record, NewCompensation):
                item = _Item(record, self._step_for(record), S.PENDING, 0, None, None)
            else:
                item = _Item(
                    record=record,
                    step=self._step_for(record),
                    state=record.state,
                    attempts=record.attempts,
                    next_attempt_at=record.next_attempt_at,
                    confirm_deadline=record.confirm_deadline,
                )
                if record.state == S.RUNNING:
                    # Not this rollback's claim: `run` released those first.
                    self._elsewhere.add(record.idempotency_key)
            self._items[record.idempotency_key] = item
        for record in fresh:
            item = self._items[record.idempotency_key]
            for dependency in record.depends_on:
                if dependency in self._items:
                    self._items[dependency].dependents.append(item.key)
        for record in fresh:
            item = self._items[record.idempotency_key]
            self._by_state[item.state] += 1
            self._late += record.late
            self._index(item)
            self._open += _is_open(item, item.state)
            self._track_deadline(item)
            if self._awaited:
                for waiter in self._awaited.pop(item.key, ()):
                    self._link(self._items[waiter], item)
        if self._plan_index is not None:
            for record in fresh:
                self._plan_index.add(record.idempotency_key, self._events[record.event_id])
        late = [(r.idempotency_key, self._events[r.event_id]) for r in fresh if r.late]
        if late:
            self._order_late(late)
        await self._refresh()

    def expect_late(self, items: Sequence[tuple[str, TrackedEvent]]) -> None:
        """Late items about to join the plan (told before they are written):
        the planned items that must wait for them stop being started now,
        not only once the run reads the late items from the ledger."""
        self._order_late(items)

    def forget_late(self, keys: Iterable[str]) -> None:
        """Late items told of by `expect_late` that were not written after all."""
        for key in keys:
            for waiter_key in self._awaited.pop(key, ()):
                waiter = self._items[waiter_key]
                if waiter.extra is not None and key in waiter.extra:
                    waiter.extra.remove(key)
                    self._one_less_to_wait_for(waiter)

    def _order_late(self, late: Sequence[tuple[str, TrackedEvent]]) -> None:
        """Order late items among the planned ones they relate to (`late_order`)."""
        if self._plan_index is None:
            self._plan_index = PlanIndex()
            for key, item in self._items.items():
                self._plan_index.add(key, self._events[item.record.event_id])
        for waiting, dependency in late_dependencies(late, self._plan_index, self.registry):
            self._wait_for(waiting, dependency)

    def _wait_for(self, waiting_key: str, dependency_key: str) -> None:
        """One more dependency of an item, found after the plan was stored."""
        waiting = self._items.get(waiting_key)
        if waiting is None:
            return  # a late item not read yet: ordered again once it is
        if dependency_key in waiting.depends_on():
            return
        dependency = self._items.get(dependency_key)
        if dependency is not None and self._waits_for(dependency, waiting_key):
            # Two orders of the same events disagree (event times that
            # contradict causation across services make the ordering of a
            # subset differ from that of the whole); held both ways, the items
            # would wait for one another for ever. The order in place stays.
            log.warning(
                "rollback %s: %s waiting for %s contradicts the order already in place "
                "(event times that disagree with causation?); it is not held for it",
                self.rollback_id,
                _describe(waiting),
                _describe(dependency),
            )
            return
        if waiting.extra is None:
            waiting.extra = []
        waiting.extra.append(dependency_key)
        waiting.waiting_on += 1
        self._ready.discard(waiting_key)
        if dependency is None:
            self._awaited.setdefault(dependency_key, []).append(waiting_key)
        else:
            self._link(waiting, dependency)

    def _waits_for(self, item: _Item, key: str) -> bool:
        """Whether `item` waits for `key`, directly or through other items.

        Confirmed and skipped items are not followed: they never wait again,
        so a cycle through one holds nothing up.
        """
        seen = {item.key}
        stack = [item]
        while stack:
            for dependency_key in stack.pop().depends_on():
                if dependency_key == key:
                    return True
                if dependency_key not in seen:
                    seen.add(dependency_key)
                    dependency = self._items.get(dependency_key)
                    if dependency is not None and dependency.state not in FINAL_STATES:
                        stack.append(dependency)
        return False

    def _link(self, waiting: _Item, dependency: _Item) -> None:
        """`waiting`, counted as waiting for `dependency`, now follows its state."""
        dependency.dependents.append(waiting.key)
        if dependency.state in (S.FAILED, S.BLOCKED):
            self._blocking_changed = True
        if _done(dependency, dependency.state):
            self._one_less_to_wait_for(waiting)

    def _one_less_to_wait_for(self, item: _Item) -> None:
        item.waiting_on -= 1
        if item.state == S.PENDING and item.waiting_on == 0:
            self._mark_ready(item)

    async def _refresh(self) -> None:
        """Apply state changes made elsewhere: confirmations tracked by another
        worker, operator retry/skip, claims of another rollback sharing a key.

        Reads only rows changed since the last refresh (minus a margin for
        clock skew between workers), so a poll costs what changed, not the
        size of the plan.
        """
        now = self.clock.now()
        since = self._last_refresh
        self._last_refresh = now
        if since is None:
            return
        states = await self.ledger.changed_states(
            self.rollback_id, since=since - timedelta(seconds=2), known_to=self.engine_id
        )
        differ = []
        for key, state in states:
            item = self._items.get(key)
            if item is not None and state != item.state and key not in self._running_here:
                differ.append(key)
        await self._read_states(differ + sorted(self._elsewhere.difference(differ)))

    async def _read_states(self, keys: list[str]) -> None:
        """Take the ledger's word for `keys`: changed elsewhere, or a write of
        this run's found them in another state than it held in memory.

        The second is how memory catches up with a confirmation its engine
        recorded but this run was not told of (tracked between the plan's
        save and the run's start): the poll leaves those out.
        """
        if not keys:
            return
        for record in await self.ledger.get_compensations(keys):
            item = self._items.get(record.idempotency_key)
            if item is None or item.key in self._running_here:
                continue
            if record.state == S.RUNNING and item.state not in FINAL_STATES:
                self._elsewhere.add(item.key)  # see `_elsewhere`
            else:
                self._elsewhere.discard(item.key)
            if record.state == item.state or item.state in FINAL_STATES:
                continue
            item.attempts = record.attempts
            item.next_attempt_at = record.next_attempt_at
            item.confirm_deadline = record.confirm_deadline
            self._set_state(item, record.state)
            self._track_deadline(item)

    def _track_deadline(self, item: _Item) -> None:
        if item.state == S.PENDING and item.next_attempt_at is not None:
            heapq.heappush(self._deadlines, (item.next_attempt_at, item.key))
        elif (
            item.state == S.APPLIED
            and item.step.confirm is not None
            and item.confirm_deadline is not None
        ):
            heapq.heappush(self._deadlines, (item.confirm_deadline, item.key))

    def _next_deadline(self, now: datetime) -> datetime | None:
        """The earliest live deadline ahead of `now` (stale entries are dropped)."""
        while self._deadlines:
            deadline, key = self._deadlines[0]
            item = self._items[key]
            live = (item.state == S.PENDING and item.next_attempt_at == deadline) or (
                item.state == S.APPLIED and item.confirm_deadline == deadline
            )
            if live and deadline > now:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    def _index(self, item: _Item) -> None:
        """Count the dependencies of a new item not yet done."""
        item.waiting_on = sum(
            1
            for d in item.record.depends_on
            if d in self._items and not _done(self._items[d], self._items[d].state)
        )
        if item.state == S.PENDING and item.waiting_on == 0:
            self._mark_ready(item)

    def _mark_ready(self, item: _Item) -> None:
        if item.key not in self._ready:
            self._ready.add(item.key)
            heapq.heappush(self._ready_heap, (item.record.position, item.key))

    def _set_state(self, item: _Item, state: S) -> None:
        """The one place a state changes in memory: keeps the ready set exact."""
        before = item.state
        if before == state or before in FINAL_STATES:
            return
        self._open += _is_open(item, state) - _is_open(item, before)
        self._by_state[before] -= 1
        self._by_state[state] += 1
        item.state = state
        if S.FAILED in (before, state) or S.BLOCKED in (before, state):
            self._blocking_changed = True
        self._ready.discard(item.key)
        if state == S.PENDING and item.waiting_on == 0:
            self._mark_ready(item)
        was_done, is_done = _done(item, before), _done(item, state)
        if was_done == is_done:
            return
        for key in item.dependents:
            dependent = self._items[key]
            dependent.waiting_on += -1 if is_done else 1
            if dependent.state == S.PENDING and dependent.waiting_on == 0:
                self._mark_ready(dependent)
            elif dependent.waiting_on:
                self._ready.discard(key)

    def _step_for(self, record: PlanRecord) -> CompensationStep:
        slot = (record.event_type, record.target_version, record.step)
        step = self._steps.get(slot)
        if step is None:
            step = self._steps[slot] = self._find_step(record)
        return step

    def _find_step(self, record: PlanRecord) -> CompensationStep:
        resolution = self.registry.resolve(record.event_type, record.target_version)
        if isinstance(resolution, Compensate) and resolution.step.name == record.step:
            return resolution.step
        for saga in self.registry.sagas:
            for step in saga.steps.values():
                if step.name == record.step:
                    return step
        raise UpcastError(
            f"compensation {record.idempotency_key} needs step {record.step!r}, "
            "which no loaded saga module defines any more"
        )

    async def _loop(self) -> RunResult:
        last_poll = self.clock.now()
        while True:
            if self._stopping:
                return RunResult(finished=False, failed=[], paused=False, stopped=True)
            if self._check_pause and self.is_paused is not None and await self.is_paused():
                await self._drain()
                return RunResult(finished=False, failed=[], paused=True, stopped=self._stopping)
            self._check_pause = False
            now = self.clock.now()
            await self._expire_confirmations(now)
            await self._block_and_unblock(now)
            parts = self._parts
            await self._take_stored_parts()
            await self._start_ready(now)
            if parts is not None:
                parts.started.set()
            if not self._inflight and self._nothing_left_to_wait_for():
                failed = [k for k, i in self._items.items() if i.state == S.FAILED]
                finished = all(_done(i, i.state) for i in self._items.values())
                return RunResult(finished=finished, failed=failed, paused=False)
            await self._wait(now)
            # Attempts acknowledged by the same produce response finish in the
            # next turn of the event loop: collect them in one ledger write.
            await asyncio.sleep(0)
            await self._collect()
            self._wake.clear()
            if self._reload or (self.clock.now() - last_poll).total_seconds() >= self.poll_interval:
                self._reload = False
                last_poll = self.clock.now()
                self._check_pause = True
                await self._load()
            if self.on_progress is not None:
                await _maybe_await(self.on_progress())

    async def _drain(self) -> None:
        """Let in-flight attempts finish and record them (pausing starts nothing new).

        Cancelling them instead would leave their claims `running`, and
        resuming would run handlers again that had already done their work.
        """
        while self._inflight and not self._stopping:
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({*self._inflight, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
            self._wake.clear()
            await self._collect(start=False)

    def _nothing_left_to_wait_for(self) -> bool:
        return self._open == 0

    def _dependency_failed(self, item: _Item) -> bool:
        return any(
            self._items[d].state in (S.FAILED, S.BLOCKED)
            for d in item.depends_on()
            if d in self._items
        )

    async def _block_and_unblock(self, now: datetime) -> None:
        if not self._blocking_changed:
            return
        self._blocking_changed = False
        if not (self._by_state[S.FAILED] or self._by_state[S.BLOCKED]):
            return  # nothing to block on, nothing blocked (a new plan: no scan)
        to_block = [
            k for k, i in self._items.items() if i.state == S.PENDING and self._dependency_failed(i)
        ]
        to_unblock = [
            k
            for k, i in self._items.items()
            if i.state == S.BLOCKED and not self._dependency_failed(i)
        ]
        for keys, state, only_from in (
            (to_block, S.BLOCKED, S.PENDING),
            (to_unblock, S.PENDING, S.BLOCKED),
        ):
            if not keys:
                continue
            moved = await self.ledger.set_states(keys, state, now=now, only_from=[only_from])
            for key in moved:
                self._set_state(self._items[key], state)
            await self._read_states(sorted(set(keys) - set(moved)))

    async def _take_stored_parts(self) -> None:
        """Once the whole plan is stored, read the state of keys it found known."""
        if self._parts is None or not self._parts.complete:
            return
        stale, self._parts = self._parts.stale, None
        await self._read_states(stale)

    def _stored(self, position: int) -> bool:
        return self._parts is None or self._parts.complete or position < self._parts.stored_up_to

    async def _start_ready(self, now: datetime, outcomes: Sequence[Outcome] = ()) -> None:
        """Claim and start ready items while slots are free; `outcomes` not yet
        in the ledger are written in the claim's transaction, before it."""
        free = self.concurrency - len(self._inflight)
        if free <= 0 or self._stopping:
            await self._record(outcomes, now)
            return
        ready: list[_Item] = []
        chosen: set[str] = set()
        deferred: list[tuple[int, str]] = []
        while self._ready_heap and len(ready) < free:
            if not self._stored(self._ready_heap[0][0]):
                break  # the rest of the heap is not stored yet either
            position, key = heapq.heappop(self._ready_heap)
            item = self._items[key]
            if key not in self._ready or key in chosen:
                continue
            if item.next_attempt_at is not None and item.next_attempt_at > now:
                deferred.append((position, key))
                continue
            ready.append(item)
            chosen.add(key)
        for entry in deferred:
            heapq.heappush(self._ready_heap, entry)
        if not ready:
            await self._record(outcomes, now)
            return
        claimed = set(
            await self.ledger.claim(
                [i.key for i in ready], now=now, rollback_id=self.rollback_id, outcomes=outcomes
            )
        )
        unclaimed = []
        # Asked once for the batch, not twice per attempt: OpenTelemetry looks
        # the answer up in os.environ each time (~1 µs) until a provider is set.
        traced = tracing.installed()
        started: dict[float, list[asyncio.Task[Outcome]]] = {}
        for item in ready:
            if item.state in FINAL_STATES:
                # Confirmed while the claim was written (the service answered
                # an attempt made before a restart): nothing left to run.
                continue
            self._set_state(item, S.RUNNING)
            if item.key not in claimed:
                unclaimed.append(item.key)
                continue
            item.attempts += 1
            self._running_here.add(item.key)
            if self._elsewhere:
                self._elsewhere.discard(item.key)
            task = asyncio.create_task(self._attempt(item, item.attempts, traced=traced))
            self._inflight[task] = item.key
            started.setdefault(item.step.retry.timeout, []).append(task)
        for timeout, tasks in started.items():
            self._timeouts.watch(tasks, timeout)
        # Not pending in the ledger: another rollback's run holds it (its
        # outcome arrives by polling), or it is done already.
        await self._read_states(unclaimed)

    async def _record(self, outcomes: Sequence[Outcome], now: datetime) -> None:
        # Nothing to write, no ledger call: a write is a shielded task and a
        # turn of the event loop.
        if outcomes:
            await self.ledger.record_outcomes(outcomes, now=now)

    async def _wait(self, now: datetime) -> None:
        # Only deadlines still ahead: one already due is either being handled
        # (started, expired) or waits for something else (a free slot, a
        # dependency, the next poll), and waking at once for it would spin.
        wake_at = now + timedelta(seconds=self.poll_interval)
        deadline = self._next_deadline(now)
        if deadline is not None:
            wake_at = min(wake_at, deadline)
        waiters: set[asyncio.Future[Any]] = set(self._inflight)
        # Until a time, not for a delay: the clock may have moved since `now`
        # was read (a test's fake clock, advanced while the loop awaited), and
        # a deadline counted from then would wake late.
        sleeper = asyncio.ensure_future(self.clock.sleep_until(wake_at))
        woken = asyncio.ensure_future(self._wake.wait())
        waiters |= {sleeper, woken}
        self.idle = not self._inflight
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.idle = False
            for helper in (sleeper, woken):
                if not helper.done():
                    helper.cancel()

    async def _collect(self, *, start: bool = True) -> None:
        """Take in the attempts that finished and, if `start`, start what is
        ready now.

        Their outcomes are applied here first, then written in the same
        ledger transaction as the claim of what is ready (a parent whose
        children are applied, another instance's next step): one write per
        round instead of two. Nothing outside this run sees the in-memory
        states before that write; if it fails, the run ends and the next one
        starts from the ledger.
        """
        done = [task for task in self._inflight if task.done()]
        if not done:
            return
        now = self.clock.now()
        outcomes = []
        for task in done:
            key = self._inflight.pop(task)
            self._running_here.discard(key)
            if self._timeouts.finished(task):  # cancelled by its timeout before it ran
                item = self._items[key]
                outcome = self._retry_or_fail(item, item.attempts, _timed_out(item.step), None)
            else:
                outcome = task.result()
            outcomes.append(self._with_deadline(outcome, now))
        failed: list[tuple[_Item, str]] = []
        for outcome in outcomes:
            item = self._items[outcome.idempotency_key]
            if item.state != S.RUNNING:
                # Overtaken by a confirmation: the ledger kept it, and so do we
                # (a failure the service answered anyway is not one).
                continue
            item.next_attempt_at = outcome.next_attempt_at
            item.confirm_deadline = outcome.confirm_deadline
            self._set_state(item, outcome.state)
            self._track_deadline(item)
            if outcome.state == S.FAILED:
                failed.append((item, outcome.error or "failed"))
        if start:
            await self._start_ready(now, outcomes)
        else:
            await self._record(outcomes, now)
        if self.on_outcome is not None:
            for outcome in outcomes:
                self.on_outcome(outcome)
        if self.failures is not None:
            for item, error in failed:
                event = self._events[item.record.event_id]
                await self.failures.compensation_failed(self.rollback_id, item.record, event, error)

    async def _expire_confirmations(self, now: datetime) -> None:
        # Every due deadline leaves the heap: a due retry is already in the
        # ready set (it starts when a slot is free; a finishing attempt wakes
        # the loop), a due confirmation timeout is handled here.
        expired: list[_Item] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, key = heapq.heappop(self._deadlines)
            item = self._items[key]
            if (
                item.state == S.APPLIED
                and item.step.confirm is not None
                and item.confirm_deadline == deadline
            ):
                expired.append(item)
        stale = []
        for item in expired:
            exhausted = item.step.retry.exhausted(item.attempts)
            error = (
                f"no {item.step.confirm} confirmed {item.key} within "
                f"{item.step.confirm_timeout:g}s (attempt {item.attempts})"
            )
            next_state = S.FAILED if exhausted else S.PENDING
            changed = await self.ledger.expire_confirmations(
                [item.key], now=now, next_state=next_state, error=error
            )
            if item.key not in changed:
                stale.append(item.key)  # not applied in the ledger any more: confirmed
            # Not if the confirmation was told while the expiry was written.
            elif item.state not in FINAL_STATES:
                item.next_attempt_at = now
                self._set_state(item, next_state)
                if exhausted and self.failures is not None:
                    await self.failures.compensation_failed(
                        self.rollback_id, item.record, self._events[item.record.event_id], error
                    )
        await self._read_states(stale)

    async def _attempt(self, item: _Item, attempt: int, *, traced: bool) -> Outcome:
        """Run one attempt; `traced`: a tracer provider is installed."""
        event = self._events[item.record.event_id]
        if not traced:
            # OpenTelemetry's no-op tracer hands back the current span as the
            # "new" one: skipping it changes nothing but the cost (two spans
            # per compensation were ~15% of a worker's CPU in a rollback).
            outcome = await self._call(item, event, attempt, traced=False)
            traceparent = tracing.traceparent_of_span(trace.get_current_span())
            if traceparent is None:
                return outcome
            return dataclasses.replace(outcome, traceparent=traceparent)
        with tracing.tracer().start_as_current_span(
            tracing.SPAN_COMPENSATE,
            links=tracing.link_to(event.traceparent, event.tracestate),
            attributes={
                tracing.ROLLBACK_ID: self.rollback_id,
                tracing.DEPLOYMENT_ID: self.deployment_id,
                tracing.EVENT_ID: event.event_id,
                tracing.EVENT_TYPE: event.event_type,
                tracing.SAGA: item.step.saga,
                tracing.STEP: item.step.name,
                tracing.IDEMPOTENCY_KEY: item.key,
                tracing.ATTEMPT: attempt,
            },
        ) as span:
            outcome = await self._call(item, event, attempt, traced=True)
            _record_outcome(span, outcome)
            return dataclasses.replace(outcome, traceparent=tracing.traceparent_of_span(span))

    async def _call(
        self, item: _Item, event: TrackedEvent, attempt: int, *, traced: bool
    ) -> Outcome:
        step = item.step
        try:
            argument = self._argument(step, event)
            envelope = envelope_from_tracked(event)
        except (UpcastError, ValueError) as exc:
            # The payload cannot be brought to the handler's model (pydantic's
            # ValidationError is a ValueError): retrying the same bytes cannot help.
            return Outcome(item.key, S.FAILED, error=f"cannot build the handler's input: {exc}")
        try:
            context = CompensationContext(
                rollback_id=self.rollback_id,
                deployment_id=self.deployment_id,
                idempotency_key=item.key,
                attempt=attempt,
                envelope=envelope,
                saga=step.saga,
                sink=self.sink,
                traced=traced,
            )
            # Its timeout is the batch's timer (`HandlerTimeouts`), which
            # cancels the attempt: no timer per attempt.
            await step.handler(argument, context)
        except PermanentError as exc:
            return Outcome(item.key, S.FAILED, error=f"permanent error: {exc}")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or not self._timeouts.timed_out(current):
                raise  # the run is stopping
            return self._retry_or_fail(item, attempt, _timed_out(step), None)
        except CompensationError as exc:
            return self._retry_or_fail(item, attempt, str(exc), exc.next_retry_delay)
        except Exception as exc:  # a user handler: any error is retried per policy
            return self._retry_or_fail(item, attempt, f"{type(exc).__name__}: {exc}", None)
        return Outcome(item.key, S.APPLIED)

    def _with_deadline(self, outcome: Outcome, now: datetime) -> Outcome:
        """An applied outcome awaiting a confirmation, with its deadline from `now`.

        Set when the batch is collected, not as each handler returns: the
        outcomes of a batch then share their values, and the ledger writes
        them as one UPDATE per group instead of one per compensation.
        """
        step = self._items[outcome.idempotency_key].step
        if outcome.state != S.APPLIED or step.confirm is None:
            return outcome
        deadline = now + timedelta(seconds=step.confirm_timeout)
        return dataclasses.replace(outcome, confirm_deadline=deadline)

    def _argument(self, step: CompensationStep, event: TrackedEvent) -> Any:
        payload = self.registry.upcast(
            event.event_type, event.schema_version, step.version, event.payload
        )
        if step.model is None:
            return payload
        return step.model.model_validate(payload)

    def _retry_or_fail(self, item: _Item, attempt: int, error: str, delay: float | None) -> Outcome:
        policy = item.step.retry
        if policy.exhausted(attempt):
            return Outcome(item.key, S.FAILED, error=f"gave up after {attempt} attempts: {error}")
        wait = delay if delay is not None else policy.delay(attempt, self.rng)
        return Outcome(
            item.key,
            S.PENDING,
            error=error,
            next_attempt_at=self.clock.now() + timedelta(seconds=wait),
        )


def _timed_out(step: CompensationStep) -> str:
    return f"handler timed out after {step.retry.timeout:g}s"


def _describe(item: _Item) -> str:
    """`<saga.step> of <event type> <event id>`, for a log line."""
    return f"{item.step.name} of {item.record.event_type} {item.record.event_id}"


def _is_open(item: _Item, state: S) -> int:
    """1 while `item` in `state` still needs this run: to run, or to be confirmed."""
    if state in (S.PENDING, S.RUNNING):
        return 1
    return int(state == S.APPLIED and item.step.confirm is not None)


def _done(item: _Item, state: S) -> bool:
    """Whether `item` in `state` no longer holds up what depends on it.

    A step that declares a confirmation is done only once confirmed: a parent
    is undone after its children's undo has really landed at the services,
    and a child that finally fails blocks its parent (DESIGN §4).
    """
    if state == S.APPLIED:
        return item.step.confirm is None
    return state in DONE_STATES


def _record_outcome(span: Span, outcome: Outcome) -> None:
    span.set_attribute(tracing.OUTCOME, outcome.state.value)
    if outcome.state in (S.PENDING, S.FAILED):
        span.set_status(Status(StatusCode.ERROR, outcome.error or outcome.state.value))


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        await value
