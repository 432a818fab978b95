"""The rollback engine: signal → plan → runs, late events, operator actions.

It owns no Kafka: commands, status records and dead letters leave through
the sinks it is given, so the same engine runs in the worker, in the saga
authors' test harness and in the unit tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from opentelemetry.trace import Span, Status, StatusCode

from sagas import tracing
from sagas.clock import Clock, SystemClock
from sagas.context import CommandSink
from sagas.errors import LedgerError, PlanningError
from sagas.executor import FailureSink, KnownPlan, PlanParts, RollbackRun, RunResult
from sagas.ledger import (
    CompensationState,
    Counts,
    Ledger,
    NewCompensation,
    Outcome,
    RollbackRecord,
    TrackedEvent,
    TrackResult,
)
from sagas.planner import Plan, plan_compensations
from sagas.registry import Ignored, SagaRegistry
from schemas.signal import RollbackSignal
from schemas.status import RollbackState, RollbackStatus

log = logging.getLogger(__name__)

# How many ignored events deep a late event's cause is followed to the blast radius.
_MAX_IGNORED_CHAIN = 16

# A large plan is stored in parts (`RollbackEngine._store_in_parts`): its run
# starts once the first part is in, of at least this many items, and the rest
# follows in transactions of at most PLAN_PART_ROWS, between which the run's
# own writes get their turn.
PLAN_FIRST_PART_MIN = 1_000
PLAN_PART_ROWS = 5_000

RESUMABLE = (RollbackState.RUNNING, RollbackState.ACCEPTED, RollbackState.PLANNING)


def _in_radius(event: TrackedEvent, deployments: set[str], known: set[str]) -> bool:
    """Whether `event` is in a rollback's blast radius: of one of its
    deployments, or among `known` (compensated by its plan, or noted in it as
    a manual action or uncovered)."""
    return event.deployment_id in deployments or event.event_id in known


class EngineObserver(Protocol):
    """Told what happens, for metrics (the worker counts with Prometheus)."""

    def compensation_outcome(self, state: str) -> None:
        """One attempt ended in `state` (applied, pending = will retry, failed...)."""

    def rollback_started(self, rollback_id: str) -> None:
        """A run of a rollback began in this process."""

    def rollback_ended(self, rollback_id: str, state: str, seconds: float | None) -> None:
        """A run ended; `seconds` from signal to end when the rollback finished."""

    def tracking_caught_up(self, seconds: float, caught_up: bool) -> None:
        """A signal waited `seconds` for tracking; `caught_up` False: time ran out."""


class TrackingProgress(Protocol):
    """How far tracking has got (the worker's tracker)."""

    async def caught_up(self, timeout: float) -> bool:
        """Wait, at most `timeout` seconds, until every event already on the
        tracked topics is in the ledger; False if that could not be seen."""


class StatusSink(Protocol):
    """Where status records go (`backout.status` in the worker)."""

    async def publish(self, status: RollbackStatus) -> None:
        """Publish one status record."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Tunables of the engine (the worker fills them from `BACKOUT_*`)."""

    max_compensations: int = 10_000
    concurrency: int = 64
    quarantine_seconds: float = 3600.0
    poll_interval: float = 0.5
    progress_interval: float = 1.0
    # Longest wait for tracking to catch up before a blast radius is read.
    catch_up_seconds: float = 10.0
    # Real seconds `stop()` gives a run to reach a safe point before cancelling it.
    stop_grace: float = 10.0


@dataclass(frozen=True, slots=True)
class BlastRadius:
    """The events a signal covers and the deployments they came from."""

    deployment_ids: list[str]
    events: list[TrackedEvent]

    @property
    def deployment_id(self) -> str:
        """The deployment(s) as one id (comma-joined if a version had several rollouts)."""
        return ",".join(self.deployment_ids)


class RollbackEngine:
    """Plans and runs rollbacks against one ledger."""

    def __init__(
        self,
        ledger: Ledger,
        registry: SagaRegistry,
        *,
        commands: CommandSink,
        status: StatusSink | None = None,
        failures: FailureSink | None = None,
        clock: Clock | None = None,
        settings: EngineSettings | None = None,
        observer: EngineObserver | None = None,
        tracking: TrackingProgress | None = None,
    ) -> None:
        self.observer = observer
        # Set by the worker once its tracker exists (the tracker needs the engine).
        self.tracking = tracking
        self.ledger = ledger
        self.registry = registry
        self.commands = commands
        self.status = status
        self.failures = failures
        self.clock = clock or SystemClock()
        self.settings = settings or EngineSettings()
        # Recorded by this process's tracker with the confirmations it hands
        # to `on_tracked`: this engine's runs, told of them in memory, leave
        # them out when they poll the ledger for changes made elsewhere.
        self.instance_id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._runs: dict[str, RollbackRun] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last_tick: dict[str, datetime] = {}
        self._recheck: set[str] = set()
        self._stopping: set[str] = set()
        # Rollbacks being planned in this process: a reconcile must not plan
        # them a second time (planning 100,000 events takes longer than its
        # 5 s timer, and both plans would then run).
        self._planning: set[str] = set()
        # Ids of events tracked while a rollback was being planned, by rollback
        # (`_late_events`): looked at once its plan is saved.
        self._held: dict[str, set[str]] = {}
        self._last_published: dict[str, dict[str, Any]] = {}
        self._last_sent_at: dict[str, datetime] = {}
        # By rollback, the status record sent without waiting for the broker
        # (`_send`), until the next one is sent after it.
        self._sending: dict[str, asyncio.Task[None]] = {}

    # -- signals ---------------------------------------------------------------

    async def handle_signal(
        self, signal: RollbackSignal, *, partition: int | None = None
    ) -> RollbackRecord:
        """Accept a rollback signal: plan it, then run it (unless a dry run).

        The same `signal_id` twice is one rollback: the second call returns
        the existing record and does nothing else.
        """
        now = self.clock.now()
        rollback_id = signal.signal_id
        traceparent, tracestate = tracing.traceparent_of(tracing.current_headers())
        created = await self.ledger.create_rollback(
            rollback_id,
            signal=signal.model_dump(mode="json"),
            deployment_id=signal.deployment_id,
            dry_run=signal.dry_run,
            state=RollbackState.ACCEPTED,
            now=now,
            signal_partition=partition,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        if not created:
            log.info("duplicate signal %s ignored", rollback_id)
            return await self.ledger.require_rollback(rollback_id)
        await self._publish(rollback_id, wait=False)
        await self._plan_once(signal)
        return await self.ledger.require_rollback(rollback_id)

    async def reject(
        self,
        rollback_id: str,
        error: str,
        *,
        deployment_id: str | None = None,
        signal: dict[str, Any] | None = None,
        partition: int | None = None,
    ) -> None:
        """Record and publish a rejected signal (bad fields, bad signature, ...)."""
        created = await self.ledger.create_rollback(
            rollback_id,
            signal=signal or {},
            deployment_id=deployment_id,
            dry_run=bool((signal or {}).get("dry_run", False)),
            state=RollbackState.REJECTED,
            now=self.clock.now(),
            signal_partition=partition,
            error=error,
        )
        if created:
            await self._publish(rollback_id)

    async def blast_radius(self, signal: RollbackSignal) -> BlastRadius:
        """The events a signal covers.

        Raises:
            PlanningError: the deployment is unknown or has no events in the window.
        """
        if signal.deployment_id is not None:
            deployment_ids = [signal.deployment_id]
            label = f"deployment {signal.deployment_id!r}"
        else:
            service, version = str(signal.service), str(signal.service_version)
            deployment_ids = await self.ledger.deployment_ids_for(service, version)
            label = f"service {service!r} version {version!r}"
        until = signal.until or signal.issued_at
        roots: list[TrackedEvent] = []
        for deployment_id in deployment_ids:
            roots += await self.ledger.deployment_events(deployment_id, signal.since, until)
        if not deployment_ids or (not roots and not await self._known(deployment_ids)):
            raise PlanningError(f"unknown deployment: no events were ever tracked for {label}")
        if not roots:
            raise PlanningError(f"{label} has no tracked events between the window's bounds")
        effects = await self._compensation_effects(roots)
        roots = [e for e in roots if e.event_id not in effects]
        events = roots
        if signal.cascade:
            closure = await self.ledger.causal_closure(roots)
            effects = await self._compensation_effects(closure)
            events = [e for e in closure if e.event_id not in effects]
        return BlastRadius(deployment_ids=deployment_ids, events=events)

    async def plan(self, signal: RollbackSignal) -> tuple[BlastRadius, Plan]:
        """Plan a signal without recording anything (the CLI's `plan`)."""
        radius = await self.blast_radius(signal)
        return radius, plan_compensations(radius.events, self.registry)

    async def _catch_up(self, rollback_id: str, span: Span) -> None:
        """Let tracking reach what is already on the event topics before the
        blast radius is read.

        A signal sent right after the events it is about (a deploy that
        failed at once, a broker that just came back) can overtake them: the
        tracker reads other partitions than the signal. Without the wait, the
        plan misses them, or the signal is rejected as an unknown deployment;
        and an event tracked after its parent was undone is undone after it.
        Bounded: a tracker far behind delays the rollback by at most
        `catch_up_seconds`; what it tracks later joins as late events.
        """
        seconds = self.settings.catch_up_seconds
        if self.tracking is None or seconds <= 0:
            return
        started = time.monotonic()
        try:
            caught_up = await self.tracking.caught_up(seconds)
        except Exception:  # tracking progress is a help, not a requirement
            log.warning("could not tell how far tracking has got", exc_info=True)
            caught_up = False
        waited = time.monotonic() - started
        span.set_attribute(tracing.TRACKING_CAUGHT_UP, caught_up)
        if self.observer is not None:
            self.observer.tracking_caught_up(waited, caught_up)
        if not caught_up:
            log.warning(
                "rollback %s: tracking did not catch up within %.1fs; planning with what is "
                "tracked (the rest joins as late events)",
                rollback_id,
                waited,
            )
        elif waited >= 0.5:
            log.info("rollback %s: waited %.1fs for tracking to catch up", rollback_id, waited)

    async def _known(self, deployment_ids: list[str]) -> bool:
        return any(d.deployment_id in deployment_ids for d in await self.ledger.list_deployments())

    async def _compensation_effects(self, events: list[TrackedEvent]) -> set[str]:
        """Events that are a service's reaction to a compensation command
        (their causation id is an idempotency key): never themselves undone."""
        causes = {e.causation_id for e in events if e.causation_id}
        if not causes:
            return set()
        keys = set(await self.ledger.compensation_states(causes))
        return {e.event_id for e in events if e.causation_id in keys}

    async def _plan_once(self, signal: RollbackSignal) -> None:
        self._planning.add(signal.signal_id)
        try:
            await self._plan_and_start(signal)
        finally:
            self._planning.discard(signal.signal_id)
        await self._release_held()

    async def _plan_and_start(self, signal: RollbackSignal) -> None:
        rollback_id = signal.signal_id
        now = self.clock.now()
        await self.ledger.set_rollback_state(rollback_id, RollbackState.PLANNING, now=now)
        await self._publish(rollback_id, wait=False)
        with tracing.tracer().start_as_current_span(
            tracing.SPAN_PLAN,
            attributes={tracing.ROLLBACK_ID: rollback_id, tracing.DRY_RUN: signal.dry_run},
        ) as span:
            await self._catch_up(rollback_id, span)
            try:
                radius, plan = await self.plan(signal)
            except PlanningError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                await self._finish(rollback_id, RollbackState.REJECTED, str(exc))
                return
            span.set_attribute(tracing.PLANNED, len(plan.items))
            if len(plan.items) > self.settings.max_compensations and not signal.force:
                error = (
                    f"blast radius of {len(plan.items)} compensations exceeds the guard "
                    f"BACKOUT_MAX_COMPENSATIONS={self.settings.max_compensations}; "
                    "send the signal again with force=true to proceed"
                )
                span.set_status(Status(StatusCode.ERROR, error))
                await self._finish(rollback_id, RollbackState.REJECTED, error)
                return
        state = RollbackState.PLANNED if signal.dry_run else RollbackState.RUNNING
        quarantine = None
        if not signal.dry_run:
            quarantine = now + timedelta(seconds=self.settings.quarantine_seconds)
        if signal.deployment_id is None:
            await self.ledger.set_deployment_of(rollback_id, radius.deployment_id)
        events = {e.event_id: e for e in radius.events}
        if not signal.dry_run and len(plan.items) > 2 * self._first_part_size():
            await self._store_in_parts(rollback_id, plan, events, quarantine=quarantine)
            return
        stored = await self.ledger.save_plan(
            rollback_id,
            plan.new_compensations(),
            manual=[n.as_dict() for n in plan.manual],
            uncovered=[n.as_dict() for n in plan.uncovered],
            state=state,
            now=self.clock.now(),
            quarantine_until=quarantine,
        )
        # A dry run's `planned` is its final record; `running` is followed by
        # progress records and a final one, each sent after it. When every
        # compensation is new the plan's counts are known without counting
        # it in the ledger (~120 ms at 100,000 compensations).
        counts = None
        if stored is not None:
            counts = Counts.from_states(
                {CompensationState.PENDING: len(stored)},
                late=0,
                manual=len(plan.manual),
                uncovered=len(plan.uncovered),
            )
        await self._publish(rollback_id, wait=signal.dry_run, counts=counts)
        if not signal.dry_run:
            # The run starts from what was just written instead of reading
            # it back: the events the plan was made from (tracked events never
            # change) and, when every compensation was new, the plan as
            # stored (together ~30% of planning 10,000 events).
            self._start(rollback_id, known=KnownPlan(events=events, items=stored))

    def _first_part_size(self) -> int:
        """Items stored before a large plan's run starts: enough for its first
        two claims."""
        return max(2 * self.settings.concurrency, PLAN_FIRST_PART_MIN)

    async def _store_in_parts(
        self,
        rollback_id: str,
        plan: Plan,
        events: dict[str, TrackedEvent],
        *,
        quarantine: datetime | None,
    ) -> None:
        """Store a large plan in parts, its run starting once the first is in.

        Storing 100,000 compensations takes seconds, in which the first
        claims could already have run. The rollback stays `planning` until
        the last part moves it to `running`, in that part's transaction: a
        worker that dies in between leaves a rollback that is planned again
        (`resume`), whose new plan keeps the state of every compensation
        already stored and done, as planning again always does. Until then
        the run claims only items already stored (`PlanParts`), and progress
        records wait (`_tick`): the first record after `planning` is
        `running`.
        """
        items = sorted(plan.new_compensations(), key=lambda i: i.position)
        size = self._first_part_size()
        head, rest = items[:size], items[size:]
        first_new = await self.ledger.add_items(
            rollback_id, head, now=self.clock.now(), planned=len(items)
        )
        parts: PlanParts | None = PlanParts(stored_up_to=rest[0].position)
        if first_new == len(head):
            self._start(rollback_id, known=KnownPlan(events=events, items=items, parts=parts))
        else:
            # Compensations of an earlier rollback: only the ledger knows their
            # state. The run starts once everything is stored, reading it back.
            parts = None
        try:
            if parts is not None:
                await self._first_claim(rollback_id, parts)
            while len(rest) > PLAN_PART_ROWS:
                part, rest = rest[:PLAN_PART_ROWS], rest[PLAN_PART_ROWS:]
                new = await self.ledger.add_items(rollback_id, part, now=self.clock.now())
                self._part_stored(rollback_id, parts, rest[0].position, part, new)
            new_plan = await self.ledger.save_plan(
                rollback_id,
                rest,
                manual=[n.as_dict() for n in plan.manual],
                uncovered=[n.as_dict() for n in plan.uncovered],
                state=RollbackState.RUNNING,
                now=self.clock.now(),
                quarantine_until=quarantine,
                planned=len(items),
            )
        except Exception:
            # The plan is not all stored: the rollback stays `planning`, and
            # planning it again (the signal retried, a reconcile, a restart)
            # stores it whole and starts a new run.
            if parts is not None:
                await self.stop([rollback_id])
            raise
        if parts is None:
            await self._publish(rollback_id, wait=False)
            self._start(rollback_id, known=KnownPlan(events=events))
            return
        self._part_stored(rollback_id, parts, None, rest, len(rest) if new_plan else 0)
        run = self._runs.get(rollback_id)
        await self._send(await self.status_of(rollback_id, run), wait=False)
        if rollback_id not in self.running():
            # Stopped meanwhile (a rebalance that kept its partition): run it
            # from the ledger, as a plan stored whole would start now.
            self._start(rollback_id)

    async def _first_claim(self, rollback_id: str, parts: PlanParts) -> None:
        """Wait until the run just started has made its first claim (or found
        nothing it could claim yet), or ended.

        The rest of the plan is stored after that claim: on SQLite, whose one
        writer takes the writes in turn, the claim would otherwise wait for a
        part of 5,000 rows, and on either ledger the part's statement would
        be built while the run indexes its plan (the first compensation of
        10,000 events on SQLite: 0.49-0.65 s after the signal before, 0.38-0.44
        s after, in 3 interleaved pairs).
        """
        task = self._tasks.get(rollback_id)
        if task is None:
            return
        started = asyncio.ensure_future(parts.started.wait())
        try:
            await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()

    def _part_stored(
        self,
        rollback_id: str,
        parts: PlanParts | None,
        next_position: int | None,
        part: Sequence[NewCompensation],
        new: int,
    ) -> None:
        """Tell the run of a plan stored in parts that one more part is in
        (`next_position` None: the last)."""
        if parts is None:
            return
        stale = [i.idempotency_key for i in part] if new != len(part) else []
        parts.stored(next_position, stale)
        run = self._runs.get(rollback_id)
        if run is not None:
            run.plan_stored()

    # -- runs ------------------------------------------------------------------

    def _start(self, rollback_id: str, *, known: KnownPlan | None = None) -> None:
        task = self._tasks.get(rollback_id)
        if task is not None and not task.done():
            # The task registers its run only after its first ledger read; a
            # run not registered yet loads everything fresh, so nothing to wake.
            run = self._runs.get(rollback_id)
            if run is not None:
                run.wake()
            # The run may be concluding already and miss the wake-up (a late
            # event arriving as it ends): its task looks again when it is done.
            self._recheck.add(rollback_id)
            return
        self._tasks[rollback_id] = asyncio.create_task(
            self._drive(rollback_id, known), name=f"rollback {rollback_id}"
        )

    async def _drive(self, rollback_id: str, known: KnownPlan | None = None) -> None:
        record = await self.ledger.require_rollback(rollback_id)
        run = RollbackRun(
            rollback_id,
            record.deployment_id or "",
            ledger=self.ledger,
            registry=self.registry,
            sink=self.commands,
            clock=self.clock,
            concurrency=self.settings.concurrency,
            failures=self.failures,
            on_progress=lambda: self._tick(rollback_id),
            on_outcome=self._count_outcome,
            is_paused=lambda: self._is_paused(rollback_id),
            poll_interval=self.settings.poll_interval,
            known=known,
            engine_id=self.instance_id,
        )
        self._runs[rollback_id] = run
        if rollback_id in self._stopping:  # stop() came while the record was read
            run.stop()
        if self.observer is not None:
            self.observer.rollback_started(rollback_id)
        state = RollbackState.RUNNING.value
        try:
            # The rollback's span is a child of the span that received its
            # signal, also when a restarted worker resumes it.
            with tracing.tracer().start_as_current_span(
                tracing.SPAN_ROLLBACK,
                context=tracing.context_from_traceparent(record.traceparent, record.tracestate),
                attributes={
                    tracing.ROLLBACK_ID: rollback_id,
                    tracing.DEPLOYMENT_ID: record.deployment_id or "",
                },
            ) as span:
                result = await run.run()
                state = await self._conclude(rollback_id, record, result)
                span.set_attribute(tracing.OUTCOME, state)
            if rollback_id in self._recheck:
                self._recheck.discard(rollback_id)
                await self._run_again_if_work_arrived(rollback_id, state)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never lose a rollback to a bug or an outage: it stays `running`
            # in the ledger and resumes on the next reconcile or restart.
            log.exception("rollback %s interrupted; it will resume", rollback_id)
        finally:
            self._runs.pop(rollback_id, None)
            if self.observer is not None:
                seconds = None
                try:
                    finished = await self.ledger.get_rollback(rollback_id)
                except Exception:  # the ledger is away (why the run ended): no duration
                    finished = None
                if finished is not None and finished.finished_at is not None:
                    seconds = (finished.finished_at - finished.created_at).total_seconds()
                self.observer.rollback_ended(rollback_id, state, seconds)

    async def _run_again_if_work_arrived(self, rollback_id: str, state: str) -> None:
        """Work added while the run was concluding (late items), or a resume
        that came while a paused run was ending, gets a new run."""
        if state == RollbackState.PAUSED:
            record = await self.ledger.get_rollback(rollback_id)
            if record is None or record.state != RollbackState.RUNNING:
                return
        elif state in (
            RollbackState.COMPLETED,
            RollbackState.COMPLETED_WITH_WARNINGS,
            RollbackState.FAILED,
        ):
            counts = await self.ledger.counts(rollback_id)
            if counts.pending == 0 and counts.running == 0:
                return
            await self.ledger.set_rollback_state(
                rollback_id, RollbackState.RUNNING, now=self.clock.now(), only_from=[state]
            )
        else:
            return
        # A new task takes over; it first runs after this one has let go of
        # its run (the `finally` of `_drive` does not wait before that).
        self._tasks[rollback_id] = asyncio.create_task(
            self._drive(rollback_id), name=f"rollback {rollback_id}"
        )

    def _count_outcome(self, outcome: Outcome) -> None:
        if self.observer is not None:
            self.observer.compensation_outcome(outcome.state.value)

    async def _conclude(self, rollback_id: str, record: RollbackRecord, result: RunResult) -> str:
        if result.stopped:
            return RollbackState.RUNNING.value  # left for the run that resumes it
        if result.paused:
            await self._publish(rollback_id)
            return RollbackState.PAUSED.value
        if result.failed:
            await self._finish(
                rollback_id,
                RollbackState.FAILED,
                f"{len(result.failed)} compensation(s) failed: {', '.join(result.failed[:5])}"
                " — retry or skip them (backout retry/skip)",
            )
            return RollbackState.FAILED.value
        latest = await self.ledger.require_rollback(rollback_id)
        warnings = bool(latest.manual or latest.uncovered)
        state = RollbackState.COMPLETED_WITH_WARNINGS if warnings else RollbackState.COMPLETED
        await self._finish(rollback_id, state, None)
        return state.value

    async def _finish(self, rollback_id: str, state: RollbackState, error: str | None) -> None:
        await self.ledger.set_rollback_state(
            rollback_id, state, now=self.clock.now(), error=error, finished=True
        )
        await self._publish(rollback_id)

    async def _is_paused(self, rollback_id: str) -> bool:
        record = await self.ledger.get_rollback(rollback_id)
        return record is not None and record.state == RollbackState.PAUSED

    async def _tick(self, rollback_id: str) -> None:
        """Progress: at most one record per interval, and only when counts moved
        (or every 30 intervals, as a heartbeat while waiting for confirmations)."""
        if rollback_id in self._planning:
            return  # its plan is still being stored: the next record is `running`
        now = self.clock.now()
        last = self._last_tick.get(rollback_id)
        elapsed = (now - last).total_seconds() if last is not None else None
        if elapsed is not None and elapsed < self.settings.progress_interval:
            return
        self._last_tick[rollback_id] = now
        if self.status is None:
            return
        status = await self.status_of(rollback_id, self._runs.get(rollback_id))
        fingerprint = status.model_dump(exclude={"updated_at"})
        sent_at = self._last_sent_at.get(rollback_id)
        heartbeat = (
            sent_at is None
            or (now - sent_at).total_seconds() >= 30 * self.settings.progress_interval
        )
        if fingerprint == self._last_published.get(rollback_id) and not heartbeat:
            return
        await self._send(status, wait=False)

    async def resume(self, partitions: Iterable[int] | None = None) -> list[str]:
        """Start runs for every unfinished rollback (after a restart or a rebalance).

        Also joins the events held for rollbacks another worker was planning.
        """
        await self._release_held()
        started = []
        for record in await self.ledger.active_rollbacks(partitions):
            if record.rollback_id in self._runs or record.rollback_id in self._planning:
                continue
            if record.state in (RollbackState.ACCEPTED, RollbackState.PLANNING):
                # Crashed before the plan was saved: plan again from the signal.
                await self._replan(record)
            elif record.state == RollbackState.RUNNING:
                self._start(record.rollback_id)
            started.append(record.rollback_id)
        return started

    async def _replan(self, record: RollbackRecord) -> None:
        try:
            signal = RollbackSignal.model_validate(record.signal)
        except ValueError as exc:
            await self._finish(record.rollback_id, RollbackState.REJECTED, f"bad signal: {exc}")
            return
        await self._plan_once(signal)

    async def stop(self, rollback_ids: Iterable[str] | None = None) -> None:
        """Stop runs (all, or some); their state stays in the ledger for resuming.

        Each run ends at its next safe point (see `RollbackRun.stop`); one
        that does not get there within `EngineSettings.stop_grace` is cancelled.
        """
        targets = list(self._tasks) if rollback_ids is None else list(rollback_ids)
        # Status records on their way: let them reach the broker first.
        sending = [s for r, s in self._sending.items() if rollback_ids is None or r in targets]
        if sending:
            await asyncio.wait(sending, timeout=self.settings.stop_grace)
        tasks = {r: self._tasks.pop(r) for r in targets if r in self._tasks}
        if not tasks:
            return
        self._stopping |= tasks.keys()
        try:
            for rollback_id in tasks:
                run = self._runs.get(rollback_id)
                if run is not None:
                    run.stop()
            _, stuck = await asyncio.wait(tasks.values(), timeout=self.settings.stop_grace)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        finally:
            self._stopping -= tasks.keys()

    def running(self) -> list[str]:
        """Ids of rollbacks with a run in this process."""
        return [r for r, t in self._tasks.items() if not t.done()]

    async def wait(self, rollback_id: str) -> RollbackRecord:
        """Wait until the run of `rollback_id` in this process ends."""
        task = self._tasks.get(rollback_id)
        if task is not None:
            await asyncio.shield(task)
        return await self.ledger.require_rollback(rollback_id)

    # -- tracking feedback ---------------------------------------------------------

    async def on_tracked(self, result: TrackResult) -> None:
        """Feed a tracked batch back: confirmations wake runs, late events join rollbacks."""
        if result.confirmed_keys:
            for run in list(self._runs.values()):
                run.confirmed(result.confirmed_keys)
            if tracing.installed():
                # Without a tracer provider the spans would be dropped anyway;
                # the ledger read for their links was ~10% of a rollback's
                # ledger time.
                await self._trace_confirmations(result)
        if result.new_events:
            await self._late_events(result.new_events, confirming=set(result.confirmed_keys))

    async def _trace_confirmations(self, result: TrackResult) -> None:
        """One `backout confirm` span per confirmation: a child of the confirming
        event's own context, linked to the compensation attempt it confirms."""
        keys = set(result.confirmed_keys)
        attempts = await self.ledger.compensation_traceparents(keys)
        for event in result.new_events:
            if event.causation_id not in keys:
                continue
            key = str(event.causation_id)
            span = tracing.tracer().start_span(
                tracing.SPAN_CONFIRM,
                context=tracing.context_from_traceparent(event.traceparent, event.tracestate),
                links=tracing.link_to(attempts.get(key)),
                attributes={
                    tracing.IDEMPOTENCY_KEY: key,
                    tracing.EVENT_ID: event.event_id,
                    tracing.EVENT_TYPE: event.event_type,
                    tracing.MESSAGING_SYSTEM: "kafka",
                    tracing.MESSAGING_DESTINATION: event.topic or "",
                },
            )
            span.end()

    async def _late_events(
        self, events: list[TrackedEvent], *, confirming: set[str] | None = None
    ) -> None:
        # An event that confirmed a compensation is a compensation's effect
        # (its causation id is a key): known without asking the ledger. In a
        # rollback nearly every tracked event is one: no query at all then.
        confirming = confirming or set()
        events = [e for e in events if e.causation_id not in confirming]
        if not events:
            return
        now = self.clock.now()
        targets = await self.ledger.quarantining_rollbacks(now, planning=True)
        if not targets:
            return
        effects = await self._compensation_effects(events)
        candidates = [e for e in events if e.event_id not in effects]
        if not candidates:
            return
        joining = []
        planning = {r.rollback_id for r in targets if r.state == RollbackState.PLANNING}
        for record in targets:
            if record.rollback_id in planning:
                # Its plan is being made from what the ledger held when the
                # blast radius was read: an event tracked since may be missing
                # from it, and cannot be told late before the plan is saved.
                # Held (ids only) until then; see `_release_held`.
                held = self._held.setdefault(record.rollback_id, set())
                held.update(e.event_id for e in candidates)
            else:
                joining.append(record)
        await self._join_late(joining, candidates)
        # Held for a plan saved since this batch's query began, or by another
        # worker: joined now rather than at the next reconcile.
        await self._release_held(targets)

    async def _join_late(
        self, records: list[RollbackRecord], candidates: list[TrackedEvent]
    ) -> None:
        """Add to each rollback the candidates it covers and has not planned."""
        if not records or not candidates:
            return
        parents = await self.ledger.events_by_id(
            e.causation_id for e in candidates if e.causation_id
        )
        cascading = any(r.signal.get("cascade", True) for r in records)
        ancestry = await self._ignored_ancestry(parents) if cascading else {}
        # Only these ids are ever looked up in `planned`: reading just them
        # keeps a tracked batch's cost independent of the size of the plans.
        relevant = (
            {e.event_id for e in candidates}
            | {e.causation_id for e in candidates if e.causation_id}
            | {cause.event_id for causes in ancestry.values() for cause in causes}
        )
        for record in records:
            deployments = set((record.deployment_id or "").split(","))
            planned = await self.ledger.planned_event_ids(record.rollback_id, relevant)
            cascade = bool(record.signal.get("cascade", True))
            known = planned | {
                str(note["event_id"]) for note in (*record.manual, *record.uncovered)
            }
            late = [
                e
                for e in candidates
                if e.event_id not in planned
                and (
                    e.deployment_id in deployments
                    or (
                        cascade
                        and e.causation_id in parents
                        and any(
                            _in_radius(cause, deployments, known)
                            for cause in (
                                parents[e.causation_id],
                                *ancestry.get(e.causation_id, ()),
                            )
                        )
                    )
                )
            ]
            if late and cascade:
                # Transitively: what the late events caused, whether it came in
                # this batch or was tracked before its cause (partitions of
                # different topics are read in no particular order).
                late += await self._late_descendants(record.rollback_id, late)
            if late:
                first_position = await self.ledger.planned_event_count(record.rollback_id)
                await self._add_late(record, late, first_position=first_position)

    async def _ignored_ancestry(
        self, parents: dict[str, TrackedEvent]
    ) -> dict[str, list[TrackedEvent]]:
        """For each ignored event of `parents`, its causes, nearest first, up
        to the first one that is not ignored (at most `_MAX_IGNORED_CHAIN`).

        An ignored event leaves no trace in a plan (no item, no note), yet the
        blast radius runs through it: it is in a rollback's radius when one of
        these causes is, and so is what it causes (`_join_late`). Read once
        per tracked batch, whatever the number of rollbacks.
        """
        ancestry: dict[str, list[TrackedEvent]] = {
            event_id: [] for event_id, parent in parents.items() if self._is_ignored(parent)
        }
        tops = {event_id: parents[event_id] for event_id in ancestry}
        for _ in range(_MAX_IGNORED_CHAIN):
            causes = {e.causation_id for e in tops.values() if e.causation_id}
            if not causes:
                break
            found = await self.ledger.events_by_id(causes)
            further: dict[str, TrackedEvent] = {}
            for event_id, top in tops.items():
                cause = found.get(top.causation_id or "")
                if cause is None:
                    continue
                ancestry[event_id].append(cause)
                if self._is_ignored(cause):
                    further[event_id] = cause
            tops = further
        return ancestry

    async def _release_held(self, targets: list[RollbackRecord] | None = None) -> None:
        """Join the events held for rollbacks that were being planned, once
        their plan is saved (by this process or another); drop them when the
        rollback takes no late events (rejected, a dry run, quarantine over).

        Args:
            targets: `quarantining_rollbacks(now, planning=True)` as just read;
                read here when not given.
        """
        if not self._held:
            return
        if targets is None:
            targets = await self.ledger.quarantining_rollbacks(self.clock.now(), planning=True)
        open_rollbacks = {r.rollback_id: r for r in targets}
        for rollback_id in list(self._held):
            record = open_rollbacks.get(rollback_id)
            if rollback_id in self._planning or (
                record is not None and record.state == RollbackState.PLANNING
            ):
                continue  # still being planned, here or by another worker
            held = self._held.pop(rollback_id)
            if record is None:
                continue
            try:
                events = await self.ledger.events_by_id(held)
                await self._join_late([record], list(events.values()))
            except BaseException:
                # The ledger is away: kept for the next batch or reconcile.
                self._held.setdefault(rollback_id, set()).update(held)
                raise

    def _is_ignored(self, event: TrackedEvent) -> bool:
        return isinstance(self.registry.resolve(event.event_type, event.schema_version), Ignored)

    async def _late_descendants(
        self, rollback_id: str, late: list[TrackedEvent]
    ) -> list[TrackedEvent]:
        """Tracked events caused by `late`, transitively, not planned yet."""
        known = {e.event_id for e in late}
        descendants = [e for e in await self.ledger.causal_closure(late) if e.event_id not in known]
        if not descendants:
            return []
        effects = await self._compensation_effects(descendants)
        planned = await self.ledger.planned_event_ids(
            rollback_id, (e.event_id for e in descendants)
        )
        leave_out = effects | planned
        return [e for e in descendants if e.event_id not in leave_out]

    async def _add_late(
        self, record: RollbackRecord, late: list[TrackedEvent], *, first_position: int
    ) -> None:
        plan = plan_compensations(late, self.registry, first_position=first_position + 1_000_000)
        now = self.clock.now()
        # A run of it here stops starting the planned items that must now wait
        # for these before they are written: meanwhile it could start one.
        run = self._runs.get(record.rollback_id)
        if run is not None:
            run.expect_late([(item.key, item.event) for item in plan.items])
        try:
            await self.ledger.add_items(
                record.rollback_id, plan.new_compensations(late=True), now=now
            )
        except BaseException:
            if run is not None:
                run.forget_late(item.key for item in plan.items)
            raise
        await self.ledger.add_manual(
            record.rollback_id, [n.as_dict() for n in plan.manual + plan.uncovered], now=now
        )
        if plan.items:
            await self.ledger.set_rollback_state(
                record.rollback_id,
                RollbackState.RUNNING,
                now=now,
                only_from=[
                    RollbackState.RUNNING,
                    RollbackState.COMPLETED,
                    RollbackState.COMPLETED_WITH_WARNINGS,
                    RollbackState.FAILED,
                ],
            )
            # Started here even if another worker owns the rollback: the
            # ledger's claims keep the two runs from doing the same step twice.
            self._start(record.rollback_id)
        await self._publish(record.rollback_id)

    # -- operator actions ------------------------------------------------------------

    async def pause(self, rollback_id: str) -> None:
        """Stop starting new compensations; in-flight ones finish."""
        record = await self.ledger.require_rollback(rollback_id)
        if record.state != RollbackState.RUNNING:
            raise LedgerError(f"rollback {rollback_id!r} is {record.state}, not running")
        await self.ledger.set_rollback_state(
            rollback_id, RollbackState.PAUSED, now=self.clock.now(), only_from=["running"]
        )
        run = self._runs.get(rollback_id)
        if run is not None:
            run.wake()
        await self._publish(rollback_id)

    async def resume_rollback(self, rollback_id: str) -> None:
        """Continue a paused (or failed, after retries/skips) rollback."""
        record = await self.ledger.require_rollback(rollback_id)
        if record.state not in (RollbackState.PAUSED, RollbackState.FAILED):
            raise LedgerError(f"rollback {rollback_id!r} is {record.state}, not paused or failed")
        await self.ledger.set_rollback_state(
            rollback_id, RollbackState.RUNNING, now=self.clock.now()
        )
        await self._publish(rollback_id)
        self._start(rollback_id)

    async def retry(self, key: str) -> list[str]:
        """Give a failed compensation a fresh attempt budget and resume its rollbacks."""
        await self.ledger.retry_compensation(key, now=self.clock.now())
        return await self._reopen(key)

    async def skip(self, key: str, reason: str) -> list[str]:
        """Give up on a compensation on purpose; its dependents may go on."""
        if not reason.strip():
            raise LedgerError("skipping a compensation needs a reason")
        await self.ledger.skip_compensation(key, reason=reason, now=self.clock.now())
        return await self._reopen(key)

    async def _reopen(self, key: str) -> list[str]:
        reopened = []
        for rollback_id in await self.ledger.rollbacks_of(key):
            moved = await self.ledger.set_rollback_state(
                rollback_id,
                RollbackState.RUNNING,
                now=self.clock.now(),
                only_from=[RollbackState.FAILED, RollbackState.RUNNING],
            )
            if moved:
                reopened.append(rollback_id)
                await self._publish(rollback_id)
                self._start(rollback_id)
        return reopened

    # -- status ------------------------------------------------------------------------

    async def status_of(
        self, rollback_id: str, run: RollbackRun | None = None, *, counts: Counts | None = None
    ) -> RollbackStatus:
        """The current status record of a rollback.

        Counts are `counts` when given, else from `run` while it runs (its
        view lags the ledger by at most one poll), else from the ledger (a
        final status is always counted in the ledger).
        """
        record = await self.ledger.require_rollback(rollback_id)
        if counts is None and run is not None:
            counts = run.counts(manual=len(record.manual), uncovered=len(record.uncovered))
        if counts is None:
            counts = await self.ledger.counts(rollback_id)
        return rollback_status(record, counts, updated_at=self.clock.now())

    async def _publish(
        self, rollback_id: str, *, wait: bool = True, counts: Counts | None = None
    ) -> None:
        if self.status is None:
            return
        await self._send(await self.status_of(rollback_id, counts=counts), wait=wait)

    async def _send(self, status: RollbackStatus, *, wait: bool = True) -> None:
        """Send a status record after the rollback's previous one.

        `wait=False` returns before the broker has it: for the records a
        rollback passes through on its way to running (`accepted`,
        `planning`, `running`) and for progress, which the next record
        supersedes. Waiting for each cost ~10 ms before the first
        compensation could start, and the run's loop ~10 ms per progress
        record. A record sent that way that fails is logged; the next one
        (a final record is always waited for) is sent all the same.
        """
        assert self.status is not None
        self._last_published[status.rollback_id] = status.model_dump(exclude={"updated_at"})
        self._last_sent_at[status.rollback_id] = self.clock.now()
        previous = self._sending.pop(status.rollback_id, None)
        sending = asyncio.ensure_future(self._send_after(previous, status))
        if wait:
            await sending
            return
        self._sending[status.rollback_id] = sending
        sending.add_done_callback(_log_unsent)

    async def _send_after(
        self, previous: asyncio.Task[None] | None, status: RollbackStatus
    ) -> None:
        # The records of one rollback reach the topic in the order they were made.
        if previous is not None:
            await asyncio.wait([previous])
        assert self.status is not None
        await self.status.publish(status)


def _log_unsent(sending: asyncio.Task[None]) -> None:
    if not sending.cancelled() and sending.exception() is not None:
        log.warning("a status record was not sent: %s", sending.exception())


def rollback_status(
    record: RollbackRecord, counts: Counts, *, updated_at: datetime
) -> RollbackStatus:
    """The status record (DESIGN §2.4) of a rollback with these counts."""
    return RollbackStatus(
        rollback_id=record.rollback_id,
        deployment_id=record.deployment_id,
        dry_run=record.dry_run,
        state=RollbackState(record.state),
        planned=counts.planned,
        applied=counts.applied,
        confirmed=counts.confirmed,
        failed=counts.failed,
        skipped=counts.skipped,
        manual=counts.manual,
        uncovered=counts.uncovered,
        late=counts.late,
        error=record.error,
        updated_at=updated_at,
    )


__all__ = [
    "BlastRadius",
    "CompensationState",
    "EngineObserver",
    "EngineSettings",
    "RollbackEngine",
    "StatusSink",
    "rollback_status",
]
