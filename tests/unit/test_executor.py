"""Running rollbacks: retries, failures, confirmations, pause, upcasting, signals.

Everything goes through `SagaTestHarness` (a real SQLite ledger, a
`FakeClock`): backoffs and confirmation timeouts take no real time. Handlers
record every call, so tests can say exactly which (key, attempt) ran when.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import BaseModel

from consumers.decoding import EventDecoder
from consumers.metrics import PrometheusObserver
from consumers.settings import Settings
from consumers.tracker import Tracker
from sagas import engine as engine_module
from sagas.context import CompensationContext, SentCommand
from sagas.definition import Saga
from sagas.engine import EngineSettings
from sagas.errors import CompensationError, LedgerError, PermanentError
from sagas.ledger import CompensationState, Counts, Outcome, RollbackRecord, TrackResult
from sagas.planner import idempotency_key
from sagas.retry import RetryPolicy
from sagas.testing import RecordingStatus, SagaTestHarness, tracked
from schemas.envelope import EventEnvelope
from schemas.headers import IDEMPOTENCY_KEY_HEADER
from schemas.status import RollbackState, RollbackStatus
from tests.support.waiting import wait_for

S = CompensationState
DONE = {S.APPLIED, S.CONFIRMED}
DEPLOYMENT = "orders-2.0"
INSTANT = 1e-6  # timedelta resolution: one microsecond
# One process, so confirmations and operator actions wake the run directly; a
# long poll makes `settle()` jump straight from one retry to the next.
NO_POLLING = EngineSettings(poll_interval=3600.0)


@dataclass(frozen=True)
class Call:
    """One handler invocation."""

    key: str
    event_id: str
    event_type: str
    attempt: int
    at: datetime
    rollback_id: str
    event: Any


class HeldStatus(RecordingStatus):
    """Keeps status records; non-final ones only once `gate` is open, and
    those whose state is in `fail` it refuses (a broker away)."""

    def __init__(self, fail: set[RollbackState] | None = None) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.fail = fail or set()
        self.waiting = 0

    async def publish(self, status: RollbackStatus) -> None:
        if status.state in self.fail:
            raise ConnectionError("broker away")
        if not status.state.is_terminal:
            self.waiting += 1
            await self.gate.wait()
            self.waiting -= 1
        await super().publish(status)


@dataclass
class Shop:
    """A checkout saga whose handlers record calls and follow a failure script.

    Compensated: OrderPlaced, PaymentCaptured (optionally confirmed by
    PaymentRefunded), StockReserved. Manual: ReceiptEmailed. Ignored: OrderViewed.
    """

    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(jitter=0))
    confirm_payment: bool = False
    confirm_timeout: float = 10.0
    settings: EngineSettings | None = None
    calls: list[Call] = field(default_factory=list)
    # event id → what successive attempts raise (None: succeed); empty → succeed.
    script: dict[str, list[BaseException | None]] = field(default_factory=dict)
    # event id → a gate the handler waits on after sending its command.
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    # event id → called inside the handler before it sends (to look at the ledger).
    probes: dict[str, Callable[[CompensationContext], Any]] = field(default_factory=dict)
    harness: SagaTestHarness | None = None

    def __post_init__(self) -> None:
        self.saga = Saga("checkout")
        self.saga.compensate("OrderPlaced", retry=self.retry)(self._handler("cancel_order"))
        self.saga.compensate(
            "PaymentCaptured",
            retry=self.retry,
            confirm="PaymentRefunded" if self.confirm_payment else None,
            confirm_timeout=self.confirm_timeout,
        )(self._handler("refund"))
        self.saga.compensate("StockReserved", retry=self.retry)(self._handler("release_stock"))
        self.saga.irreversible("ReceiptEmailed", action="Apologise to the customer by e-mail")
        self.saga.ignore("OrderViewed")

    async def __aenter__(self) -> Shop:
        self.harness = SagaTestHarness(self.saga, settings=self.settings)
        await self.harness.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for gate in self.gates.values():
            gate.set()
        assert self.harness is not None
        await self.harness.__aexit__(exc_type, exc, traceback)

    @property
    def h(self) -> SagaTestHarness:
        assert self.harness is not None
        return self.harness

    def _handler(self, name: str) -> Callable[[Any, CompensationContext], Any]:
        async def handler(event: Any, ctx: CompensationContext) -> None:
            envelope = ctx.envelope
            self.calls.append(
                Call(
                    key=ctx.idempotency_key,
                    event_id=envelope.event_id,
                    event_type=envelope.event_type,
                    attempt=ctx.attempt,
                    at=self.h.clock.now(),
                    rollback_id=ctx.rollback_id,
                    event=event,
                )
            )
            probe = self.probes.get(envelope.event_id)
            if probe is not None:
                await probe(ctx)
            script = self.script.get(envelope.event_id)
            if script:
                failure = script.pop(0)
                if failure is not None:
                    raise failure
            await ctx.send(
                f"{envelope.service}.commands",
                {"undo": envelope.event_type, "event_id": envelope.event_id},
                key=envelope.key,
            )
            gate = self.gates.get(envelope.event_id)
            if gate is not None:
                await gate.wait()

        handler.__name__ = name
        return handler

    # -- events --------------------------------------------------------------------

    def event(self, event_type: str, **fields: Any) -> EventEnvelope:
        fields.setdefault("deployment_id", DEPLOYMENT)
        return self.h.envelope(event_type, fields.pop("payload", {}), **fields)

    async def checkout(
        self, correlation_id: str, *, deployment_id: str = DEPLOYMENT
    ) -> list[EventEnvelope]:
        """One saga instance: order → payment → stock, each caused by the one before."""
        placed = self.event(
            "OrderPlaced", correlation_id=correlation_id, deployment_id=deployment_id
        )
        paid = self.event(
            "PaymentCaptured",
            correlation_id=correlation_id,
            causation_id=placed.event_id,
            deployment_id=deployment_id,
            service="payments",
        )
        reserved = self.event(
            "StockReserved",
            correlation_id=correlation_id,
            causation_id=paid.event_id,
            deployment_id=deployment_id,
            service="inventory",
        )
        await self.h.emit(placed, paid, reserved)
        return [placed, paid, reserved]

    def healthy_payment(self, *, caused_by: EventEnvelope | None = None) -> EventEnvelope:
        """A PaymentCaptured of the payments service's healthy deployment (not tracked)."""
        if caused_by is None:
            return self.event("PaymentCaptured", deployment_id="payments-5.0")
        return self.event(
            "PaymentCaptured",
            deployment_id="payments-5.0",
            service="payments",
            causation_id=caused_by.event_id,
        )

    async def captured_payment(self) -> EventEnvelope:
        """One PaymentCaptured of the payments service, tracked."""
        paid = self.event("PaymentCaptured", service="payments")
        await self.h.emit(paid)
        return paid

    async def refund_awaiting_confirmation(self) -> tuple[EventEnvelope, RollbackRecord]:
        """A running rollback of one captured payment: its refund sent once and applied."""
        paid = await self.captured_payment()
        record = await self.h.rollback(DEPLOYMENT, settle=False)
        await until(lambda: len(self.h.sent) == 1, "first refund sent")
        # A confirmation deadline counts from the handler's return: let its outcome land first.
        await self.until_state(paid, S.APPLIED)
        return paid, record

    # -- inspection ------------------------------------------------------------------

    def calls_of(self, event: EventEnvelope) -> list[Call]:
        return [c for c in self.calls if c.event_id == event.event_id]

    def sent_for(self, event: EventEnvelope) -> list[SentCommand]:
        return [c for c in self.h.sent if c.json()["event_id"] == event.event_id]

    def sent_order(self) -> list[str]:
        return [c.json()["event_id"] for c in self.h.sent]

    async def state_of(self, event: EventEnvelope) -> S:
        record = await self.h.ledger.get_compensation(self.key(event))
        assert record is not None, f"{event.event_type} {event.event_id} was never planned"
        return record.state

    async def until_state(self, event: EventEnvelope, state: S) -> None:
        """Wait (real time, briefly) until the ledger holds `state` for `event`'s compensation."""

        async def reached() -> bool:
            return await self.state_of(event) == state

        await wait_for(reached, timeout=5.0, interval=0.002, message=f"{event.event_type} {state}")

    def key(self, event: EventEnvelope) -> str:
        step = {
            "OrderPlaced": "cancel_order",
            "PaymentCaptured": "refund",
            "StockReserved": "release_stock",
        }[event.event_type]
        return idempotency_key(event.event_id, f"checkout.{step}")


def spacing(calls: list[Call]) -> list[float]:
    """Seconds (fake time) between successive calls."""
    return [(b.at - a.at).total_seconds() for a, b in itertools.pairwise(calls)]


def hold(
    ledger: Any, name: str, *, before_the_call: bool = False
) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the ledger's `name` wait at a gate, after (or before) its real call.

    Returns (reached, gate): `reached` is set when a call waits, setting
    `gate` lets every call through. Something can then land in between.
    """
    reached, gate = asyncio.Event(), asyncio.Event()
    method = getattr(ledger, name)

    async def held(*args: Any, **kwargs: Any) -> Any:
        if before_the_call:
            reached.set()
            await gate.wait()
            return await method(*args, **kwargs)
        result = await method(*args, **kwargs)
        reached.set()
        await gate.wait()
        return result

    setattr(ledger, name, held)
    return reached, gate


async def until(predicate: Callable[[], Any], message: str) -> None:
    """Wait (real time, briefly) for something the run does without the clock moving."""
    await wait_for(predicate, timeout=5.0, interval=0.002, message=message)


# ------------------------------------------------------------------ retries


class TestRetries:
    async def test_backoff_is_exponential_without_jitter(self) -> None:
        policy = RetryPolicy(max_attempts=5, initial_delay=1.0, multiplier=2.0, jitter=0)
        async with Shop(retry=policy, settings=NO_POLLING) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            shop.script[placed.event_id] = [ConnectionError("orders down")] * 3
            scheduled: list[datetime | None] = []

            async def look(ctx: CompensationContext) -> None:
                record = await shop.h.ledger.get_compensation(ctx.idempotency_key)
                assert record is not None
                scheduled.append(record.next_attempt_at)

            shop.probes[placed.event_id] = look
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.COMPLETED
            calls = shop.calls_of(placed)
            assert [c.attempt for c in calls] == [1, 2, 3, 4]
            assert {c.key for c in calls} == {shop.key(placed)}
            gaps = spacing(calls)
            assert gaps == [1.0, 2.0, 4.0]
            # Each retry ran exactly when the ledger said it would.
            assert scheduled[0] is None
            assert scheduled[1:] == [c.at for c in calls[1:]]
            assert len(shop.sent_for(placed)) == 1

    async def test_backoff_is_capped_by_max_delay(self) -> None:
        policy = RetryPolicy(max_attempts=6, initial_delay=1.0, max_delay=3.0, jitter=0)
        async with Shop(retry=policy, settings=NO_POLLING) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            shop.script[placed.event_id] = [TimeoutError("slow")] * 5
            await shop.h.rollback(DEPLOYMENT)
            calls = shop.calls_of(placed)
            gaps = spacing(calls)
            assert gaps == [1.0, 2.0, 3.0, 3.0, 3.0]

    async def test_backoff_grows_within_jitter_bounds(self) -> None:
        policy = RetryPolicy(max_attempts=7, initial_delay=1.0, multiplier=2.0, jitter=0.2)
        async with Shop(retry=policy, settings=NO_POLLING) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            shop.script[placed.event_id] = [ConnectionError("orders down")] * 6
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.COMPLETED
            calls = shop.calls_of(placed)
            gaps = spacing(calls)
            bases = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
            assert len(gaps) == len(bases)
            for gap, base in zip(gaps, bases, strict=True):
                assert base * 0.8 - INSTANT <= gap <= base * 1.2 + INSTANT
            assert gaps == sorted(gaps)
            assert len(set(gaps)) == len(gaps)
            # Jitter is really applied (equality with every base has probability 0).
            assert any(abs(g - b) > INSTANT for g, b in zip(gaps, bases, strict=True))

    async def test_retry_after_from_the_error_overrides_the_backoff(self) -> None:
        async with Shop(retry=RetryPolicy(jitter=0), settings=NO_POLLING) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            shop.script[placed.event_id] = [CompensationError("busy", next_retry_delay=42.0)]
            await shop.h.rollback(DEPLOYMENT)
            first, second = shop.calls_of(placed)
            assert (second.at - first.at).total_seconds() == 42.0

    async def test_an_ordinary_value_error_in_a_handler_is_retried(self) -> None:
        # Only PermanentError (and an unbuildable input) stop retrying; a
        # handler's own ValueError is as transient as any other exception.
        async with Shop() as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            shop.script[placed.event_id] = [ValueError("service said 503 in a weird way")]
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.COMPLETED
            assert [c.attempt for c in shop.calls_of(placed)] == [1, 2]

    async def test_exhausted_retries_fail_the_compensation_and_the_rollback(self) -> None:
        async with Shop(retry=RetryPolicy(max_attempts=3, jitter=0)) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            shop.script[placed.event_id] = [ConnectionError("orders down")] * 10
            record = await shop.h.rollback(DEPLOYMENT)

            key = shop.key(placed)
            assert record.state == RollbackState.FAILED
            assert record.error is not None
            assert key in record.error
            assert "retry or skip" in record.error
            assert [c.attempt for c in shop.calls_of(placed)] == [1, 2, 3]
            assert shop.h.sent == []
            expected = "gave up after 3 attempts: ConnectionError: orders down"
            assert shop.h.failures.failed == [(record.rollback_id, key, expected)]
            stored = await shop.h.ledger.get_compensation(key)
            assert stored is not None
            assert (stored.state, stored.attempts, stored.last_error) == (S.FAILED, 3, expected)
            status = await shop.h.engine.status_of(record.rollback_id)
            assert (status.failed, status.applied, status.planned) == (1, 0, 1)
            assert shop.h.statuses.states(record.rollback_id)[-1] == RollbackState.FAILED

    async def test_permanent_error_fails_after_one_attempt(self) -> None:
        async with Shop(retry=RetryPolicy(max_attempts=10)) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            shop.script[placed.event_id] = [PermanentError("order o1 was archived")]
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.FAILED
            assert len(shop.calls_of(placed)) == 1
            (failure,) = shop.h.failures.failed
            assert failure[1] == shop.key(placed)
            assert failure[2] == "permanent error: order o1 was archived"

    async def test_handler_timeout_counts_as_a_failed_attempt(self) -> None:
        # The handler timeout is real time (the event loop's timer): keep it tiny.
        cancelled: list[bool] = []

        async with Shop(retry=RetryPolicy(max_attempts=2, jitter=0, timeout=0.05)) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            hang = asyncio.Event()

            async def hang_first_time(ctx: CompensationContext) -> None:
                if ctx.attempt == 1:
                    try:
                        await hang.wait()
                    except asyncio.CancelledError:
                        cancelled.append(True)
                        raise

            shop.probes[placed.event_id] = hang_first_time
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.COMPLETED
            assert [c.attempt for c in shop.calls_of(placed)] == [1, 2]
            assert cancelled == [True]
            assert len(shop.sent_for(placed)) == 1

    async def test_handler_timeout_error_is_readable_when_exhausted(self) -> None:
        async with Shop(retry=RetryPolicy(max_attempts=1, timeout=0.05)) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)

            async def hang(ctx: CompensationContext) -> None:
                await asyncio.Event().wait()

            shop.probes[placed.event_id] = hang
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.FAILED
            (failure,) = shop.h.failures.failed
            assert failure[2] == "gave up after 1 attempts: handler timed out after 0.05s"

    async def test_a_handlers_own_timeout_error_is_not_reported_as_its_timeout(self) -> None:
        # A TimeoutError raised by the handler (its HTTP client's, say) is its
        # error, not the step's timeout, which has not run out.
        async with Shop(retry=RetryPolicy(max_attempts=1, timeout=30)) as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)

            async def upstream_slow(ctx: CompensationContext) -> None:
                raise TimeoutError("the payment provider took too long")

            shop.probes[placed.event_id] = upstream_slow
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.FAILED
            (failure,) = shop.h.failures.failed
            assert failure[2] == (
                "gave up after 1 attempts: TimeoutError: the payment provider took too long"
            )

    async def test_a_failing_command_sink_is_retried(self) -> None:
        async with Shop() as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            shop.h.commands.failures_left = 2
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.COMPLETED
            assert [c.attempt for c in shop.calls_of(placed)] == [1, 2, 3]
            assert len(shop.h.sent) == 1


# ------------------------------------------------------------- failure isolation


class TestPlanInParts:
    """A large plan is stored in parts; its run starts on the first one."""

    @pytest.fixture(autouse=True)
    def small_parts(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # A first part of 4 items (2 x concurrency 2), then parts of 3: a
        # plan of 12 is stored as 4 + 3 + 3 + 2.
        monkeypatch.setattr(engine_module, "PLAN_FIRST_PART_MIN", 4)
        monkeypatch.setattr(engine_module, "PLAN_PART_ROWS", 3)

    @staticmethod
    def held_after_first_part(shop: Shop, fail: bool = False) -> asyncio.Event:
        """Hold every part after the first at a gate (and then fail it, if `fail`)."""
        gate = asyncio.Event()
        add_items = shop.h.ledger.add_items
        calls = itertools.count()

        async def held(*args: Any, **kwargs: Any) -> int:
            if next(calls) > 0:
                await gate.wait()
                if fail:
                    raise LedgerError("ledger unreachable")
            return await add_items(*args, **kwargs)

        shop.h.ledger.add_items = held  # type: ignore[method-assign]
        return gate

    async def test_the_first_part_runs_while_the_rest_is_stored(self) -> None:
        async with Shop(settings=EngineSettings(concurrency=2, poll_interval=0.5)) as shop:
            payments = [await shop.captured_payment() for _ in range(12)]
            gate = self.held_after_first_part(shop)
            planning = asyncio.ensure_future(shop.h.rollback(DEPLOYMENT, settle=False))
            await until(lambda: len(shop.h.sent) == 4, "the first part's refunds sent")
            rollback_id = shop.h.statuses.records[0].rollback_id
            first_part = [c.idempotency_key for c in await shop.h.compensations(rollback_id)]
            assert len(first_part) == 4
            for payment in payments:
                if shop.key(payment) in first_part:
                    await shop.until_state(payment, S.APPLIED)
            # Nothing beyond the stored part was claimed, and the rollback is
            # `planning` until its last part is in, with no progress record.
            assert sorted(shop.h.keys_sent()) == sorted(first_part)
            assert (await shop.h.ledger.require_rollback(rollback_id)).state == "planning"
            assert shop.h.statuses.states(rollback_id) == ["accepted", "planning"]

            gate.set()
            await planning
            done = await shop.h.settle(rollback_id)

            assert done.state == RollbackState.COMPLETED
            assert sorted(shop.h.keys_sent()) == sorted(shop.key(p) for p in payments)
            assert shop.h.statuses.states(rollback_id) == [
                "accepted",
                "planning",
                "running",
                "completed",
            ]
            plan = await shop.h.compensations(rollback_id)
            assert [c.position for c in plan] == list(range(12))

    async def test_the_run_claims_before_the_rest_is_stored(self) -> None:
        # SQLite takes writes in turn: a part stored first would hold the
        # first claim, and the first compensation, back.
        async with Shop(settings=EngineSettings(concurrency=2, poll_interval=0.5)) as shop:
            for _ in range(12):
                await shop.captured_payment()
            writes: list[str] = []
            add_items, claim = shop.h.ledger.add_items, shop.h.ledger.claim

            async def logged_add_items(*args: Any, **kwargs: Any) -> int:
                writes.append("add_items")
                return await add_items(*args, **kwargs)

            async def logged_claim(*args: Any, **kwargs: Any) -> list[str]:
                writes.append("claim")
                return await claim(*args, **kwargs)

            shop.h.ledger.add_items = logged_add_items  # type: ignore[method-assign]
            shop.h.ledger.claim = logged_claim  # type: ignore[method-assign]
            done = await shop.h.rollback(DEPLOYMENT)

            assert done.state == RollbackState.COMPLETED
            # The first part, the run's first claim, then the second part.
            assert writes[:3] == ["add_items", "claim", "add_items"]

    async def test_a_plan_whose_rest_cannot_be_stored_is_planned_again(self) -> None:
        async with Shop(settings=EngineSettings(concurrency=2, poll_interval=0.5)) as shop:
            payments = [await shop.captured_payment() for _ in range(12)]
            gate = self.held_after_first_part(shop, fail=True)
            planning = asyncio.ensure_future(shop.h.rollback(DEPLOYMENT, settle=False))
            await until(lambda: len(shop.h.sent) == 4, "the first part's refunds sent")
            rollback_id = shop.h.statuses.records[0].rollback_id
            first_part = shop.h.keys_sent()
            for payment in payments:
                if shop.key(payment) in first_part:
                    await shop.until_state(payment, S.APPLIED)

            gate.set()  # the next part fails: the ledger is away
            with pytest.raises(LedgerError):
                await planning
            # The run stopped; the rollback stays `planning`, to be planned again.
            assert shop.h.engine.running() == []
            assert (await shop.h.ledger.require_rollback(rollback_id)).state == "planning"

            del shop.h.ledger.add_items  # the ledger is back
            await shop.h.crash_and_restart()
            done = await shop.h.settle(rollback_id)

            assert done.state == RollbackState.COMPLETED
            # Planned again, the first part's refunds are known as applied:
            # each refund was sent once.
            assert sorted(shop.h.keys_sent()) == sorted(shop.key(p) for p in payments)
            assert all(c.state == S.APPLIED for c in await shop.h.compensations(rollback_id))

    async def test_compensations_known_from_an_earlier_rollback_are_not_run_again(
        self,
    ) -> None:
        async with Shop(settings=EngineSettings(concurrency=2, poll_interval=0.5)) as shop:
            older = [await shop.captured_payment() for _ in range(4)]
            assert (await shop.h.rollback(DEPLOYMENT)).state == RollbackState.COMPLETED
            newer = [await shop.captured_payment() for _ in range(8)]

            again = await shop.h.rollback(DEPLOYMENT)

            assert again.state == RollbackState.COMPLETED
            # Newest first: the first part is new, the refunds already applied
            # are in the last two parts; the run found them done.
            plan = await shop.h.compensations(again.rollback_id)
            assert [c.idempotency_key for c in plan[8:]] == [shop.key(p) for p in reversed(older)]
            assert sorted(shop.h.keys_sent()) == sorted(shop.key(p) for p in older + newer)
            assert all(c.state == S.APPLIED for c in plan)
            final = shop.h.statuses.records[-1]
            assert (final.state, final.planned, final.applied) == ("completed", 12, 12)


class TestLedgerWrites:
    async def test_outcomes_are_written_with_the_claim_of_what_they_made_ready(self) -> None:
        # One ledger write per round: the outcomes of the attempts that just
        # finished go into the transaction of the next claim, written first.
        async with Shop() as shop:
            placed, paid, reserved = await shop.checkout("c-1")
            writes: list[tuple[str, list[str], list[tuple[str, S]]]] = []
            ledger = shop.h.ledger
            claim, record_outcomes = ledger.claim, ledger.record_outcomes

            async def claiming(keys: list[str], **kwargs: Any) -> list[str]:
                outcomes = [(o.idempotency_key, o.state) for o in kwargs.get("outcomes", ())]
                writes.append(("claim", list(keys), outcomes))
                return await claim(keys, **kwargs)

            async def recording(outcomes: list[Outcome], **kwargs: Any) -> None:
                if outcomes:
                    writes.append(
                        ("outcomes", [], [(o.idempotency_key, o.state) for o in outcomes])
                    )
                await record_outcomes(outcomes, **kwargs)

            ledger.claim = claiming  # type: ignore[method-assign]
            ledger.record_outcomes = recording  # type: ignore[method-assign]
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.COMPLETED
            stock, payment, order = (shop.key(e) for e in (reserved, paid, placed))
            assert writes == [
                ("claim", [stock], []),
                ("claim", [payment], [(stock, S.APPLIED)]),
                ("claim", [order], [(payment, S.APPLIED)]),
                ("outcomes", [], [(order, S.APPLIED)]),
            ]
            assert await shop.state_of(placed) == S.APPLIED


class TestFailureIsolation:
    async def test_a_failed_step_blocks_only_its_own_instance(self) -> None:
        async with Shop(retry=RetryPolicy(max_attempts=2, jitter=0)) as shop:
            bad_order, bad_payment, bad_stock = await shop.checkout("c-bad")
            good = await shop.checkout("c-good")
            shop.script[bad_payment.event_id] = [PermanentError("refund refused")]
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.FAILED
            # The bad instance: stock undone, payment failed, order blocked behind it.
            assert await shop.state_of(bad_stock) == S.APPLIED
            assert await shop.state_of(bad_payment) == S.FAILED
            assert await shop.state_of(bad_order) == S.BLOCKED
            assert shop.calls_of(bad_order) == []
            # The other instance went on to the end.
            assert [await shop.state_of(e) for e in good] == [S.APPLIED] * 3
            assert [e.event_id for e in reversed(good)] == [
                x for x in shop.sent_order() if x in {e.event_id for e in good}
            ]
            counts = await shop.h.ledger.counts(record.rollback_id)
            assert (counts.applied, counts.failed, counts.blocked) == (4, 1, 1)

    async def test_operator_retry_completes_the_rollback(self) -> None:
        async with Shop(retry=RetryPolicy(max_attempts=2, jitter=0)) as shop:
            order, payment, stock = await shop.checkout("c1")
            shop.script[payment.event_id] = [PermanentError("refund refused")]
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.FAILED

            # The payments team fixed their side; the operator retries.
            reopened = await shop.h.engine.retry(shop.key(payment))
            assert reopened == [record.rollback_id]
            record = await shop.h.settle(record.rollback_id)

            assert record.state == RollbackState.COMPLETED
            assert record.error is None
            assert [await shop.state_of(e) for e in (order, payment, stock)] == [S.APPLIED] * 3
            assert [c.attempt for c in shop.calls_of(payment)] == [1, 1]  # fresh budget
            assert shop.sent_order() == [stock.event_id, payment.event_id, order.event_id]
            assert shop.h.statuses.states(record.rollback_id)[-3:] == [
                RollbackState.FAILED,
                RollbackState.RUNNING,
                RollbackState.COMPLETED,
            ]

    async def test_operator_retry_of_a_compensation_that_did_not_fail_is_refused(self) -> None:
        async with Shop() as shop:
            placed = shop.event("OrderPlaced")
            await shop.h.emit(placed)
            await shop.h.rollback(DEPLOYMENT)
            with pytest.raises(LedgerError, match="it is applied"):
                await shop.h.engine.retry(shop.key(placed))
            with pytest.raises(LedgerError, match="unknown compensation"):
                await shop.h.engine.retry("no-such-key")

    async def test_operator_skip_lets_dependents_go_on(self) -> None:
        async with Shop(retry=RetryPolicy(max_attempts=2, jitter=0)) as shop:
            order, payment, stock = await shop.checkout("c1")
            shop.script[payment.event_id] = [PermanentError("refund refused")] * 5
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.FAILED

            with pytest.raises(LedgerError, match="reason"):
                await shop.h.engine.skip(shop.key(payment), "  ")
            reason = "refunded by hand in the PSP dashboard (ticket OPS-12)"
            assert await shop.h.engine.skip(shop.key(payment), reason) == [record.rollback_id]
            record = await shop.h.settle(record.rollback_id)

            assert record.state == RollbackState.COMPLETED
            skipped = await shop.h.ledger.get_compensation(shop.key(payment))
            assert skipped is not None
            assert (skipped.state, skipped.skip_reason) == (S.SKIPPED, reason)
            assert await shop.state_of(order) == S.APPLIED
            assert len(shop.calls_of(payment)) == 1
            assert shop.sent_order() == [stock.event_id, order.event_id]
            status = await shop.h.engine.status_of(record.rollback_id)
            assert (status.applied, status.skipped, status.failed) == (2, 1, 0)

    async def test_a_due_retry_waiting_for_a_free_slot_does_not_spin(self) -> None:
        settings = EngineSettings(concurrency=1, poll_interval=0.5)
        async with Shop(retry=RetryPolicy(jitter=0), settings=settings) as shop:
            early, late = shop.event("OrderPlaced"), shop.event("OrderPlaced")
            await shop.h.emit(early, late)
            shop.script[late.event_id] = [ConnectionError("orders down")]
            shop.gates[early.event_id] = asyncio.Event()
            record = await shop.h.rollback(DEPLOYMENT, settle=False)
            # `late` is undone first, fails once; `early` then holds the only slot.
            await until(lambda: len(shop.h.sent) == 1, "early's compensation in flight")
            await shop.h.clock.advance(5)  # late's retry is due, but no slot is free

            checks = 0
            get_rollback = shop.h.ledger.get_rollback

            async def counting(rollback_id: str) -> Any:
                nonlocal checks
                checks += 1
                return await get_rollback(rollback_id)

            shop.h.ledger.get_rollback = counting  # type: ignore[method-assign]
            await asyncio.sleep(0.05)
            # A run that waits reads the ledger once per wake-up, not in a loop.
            assert checks <= 2

            shop.gates[early.event_id].set()
            record = await shop.h.settle(record.rollback_id)
            assert record.state == RollbackState.COMPLETED
            assert [c.attempt for c in shop.calls_of(late)] == [1, 2]


# --------------------------------------------------------------- confirmations


class TestConfirmations:
    async def test_confirmed_by_the_right_type_caused_by_the_key(self) -> None:
        async with Shop(confirm_payment=True) as shop:
            paid = shop.event("PaymentCaptured", service="payments")
            other = shop.event("PaymentCaptured", service="payments")
            await shop.h.emit(paid, other)
            record = await shop.h.rollback(DEPLOYMENT, settle=False)
            await until(lambda: len(shop.h.sent) == 2, "both refunds sent")
            command = shop.sent_for(paid)[0]
            assert command.header(IDEMPOTENCY_KEY_HEADER) == shop.key(paid)

            # Wrong type, right key: not a confirmation.
            assert (await shop.h.confirm(command, "PaymentFailed")).confirmed_keys == []
            # Right type, but caused by something else than the key.
            stray = shop.h.envelope(
                "PaymentRefunded", {}, deployment_id="payments-9", causation_id=str(uuid.uuid4())
            )
            assert (await shop.h.emit(stray)).confirmed_keys == []
            assert await shop.state_of(paid) == S.APPLIED

            result = await shop.h.confirm(command, "PaymentRefunded")
            assert result.confirmed_keys == [shop.key(paid)]
            assert await shop.state_of(paid) == S.CONFIRMED
            assert await shop.state_of(other) == S.APPLIED
            await shop.h.confirm(shop.sent_for(other)[0], "PaymentRefunded")
            record = await shop.h.settle(record.rollback_id)

            assert record.state == RollbackState.COMPLETED
            status = await shop.h.engine.status_of(record.rollback_id)
            assert (status.applied, status.confirmed) == (2, 2)
            # Confirmations are reactions to compensations, not late events to undo.
            assert status.late == 0
            assert len(shop.calls) == 2

    async def test_timeout_reruns_the_handler_with_the_same_key(self) -> None:
        async with Shop(confirm_payment=True, confirm_timeout=10.0) as shop:
            paid, record = await shop.refund_awaiting_confirmation()
            await shop.h.clock.advance(9.9)
            await asyncio.sleep(0.01)
            assert len(shop.calls) == 1
            await shop.h.clock.advance(0.1)
            await until(lambda: len(shop.h.sent) == 2, "refund sent again after the timeout")

            first, second = shop.calls
            assert (first.attempt, second.attempt) == (1, 2)
            assert first.key == second.key == shop.key(paid)
            assert (second.at - first.at).total_seconds() == 10.0
            keys = [c.header(IDEMPOTENCY_KEY_HEADER) for c in shop.h.sent]
            assert keys == [shop.key(paid)] * 2

            await shop.h.confirm(shop.h.sent[1], "PaymentRefunded")
            record = await shop.h.settle(record.rollback_id)
            assert record.state == RollbackState.COMPLETED
            assert len(shop.calls) == 2

    async def test_a_confirmation_for_the_first_send_still_counts_after_a_rerun(self) -> None:
        async with Shop(confirm_payment=True, confirm_timeout=10.0) as shop:
            paid, record = await shop.refund_awaiting_confirmation()
            await shop.h.clock.advance(10)
            await until(lambda: len(shop.h.sent) == 2, "refund sent again")
            # The slow service finally answers the first command: same key, so it confirms.
            await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
            record = await shop.h.settle(record.rollback_id)
            assert record.state == RollbackState.COMPLETED
            assert await shop.state_of(paid) == S.CONFIRMED

    async def test_confirmation_timeouts_use_up_the_retry_budget(self) -> None:
        async with Shop(
            confirm_payment=True,
            confirm_timeout=10.0,
            retry=RetryPolicy(max_attempts=3),
            settings=NO_POLLING,
        ) as shop:
            paid = await shop.captured_payment()
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.FAILED
            assert [c.attempt for c in shop.calls] == [1, 2, 3]
            assert {c.key for c in shop.calls} == {shop.key(paid)}
            gaps = spacing(shop.calls)
            assert gaps == [10.0, 10.0]
            (failure,) = shop.h.failures.failed
            assert failure[1] == shop.key(paid)
            assert failure[2] == (
                f"no PaymentRefunded confirmed {shop.key(paid)} within 10s (attempt 3)"
            )
            assert await shop.state_of(paid) == S.FAILED

    async def test_confirmation_before_the_outcome_is_recorded_wins(self) -> None:
        async with Shop(confirm_payment=True, confirm_timeout=10.0) as shop:
            paid = await shop.captured_payment()
            shop.gates[paid.event_id] = asyncio.Event()
            record = await shop.h.rollback(DEPLOYMENT, settle=False)
            await until(lambda: len(shop.h.sent) == 1, "refund sent")
            assert await shop.state_of(paid) == S.RUNNING

            # The service is faster than the handler's return.
            result = await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
            assert result.confirmed_keys == [shop.key(paid)]
            shop.gates[paid.event_id].set()
            record = await shop.h.settle(record.rollback_id)

            assert record.state == RollbackState.COMPLETED
            assert await shop.state_of(paid) == S.CONFIRMED
            # The handler's own "applied, waiting for confirmation" did not win:
            # no timeout, no second run, even long after the deadline.
            await shop.h.clock.advance(3600)
            assert len(shop.calls) == 1
            assert await shop.state_of(paid) == S.CONFIRMED

    async def test_a_confirmation_told_while_the_plan_is_read_is_kept(self) -> None:
        # A restarted engine's run reads the plan: the refund shows applied.
        # The confirmation lands right after that read, before the run holds
        # any item, and its polls leave out what its engine was told of.
        async with Shop(confirm_payment=True, confirm_timeout=3600.0) as shop:
            paid, record = await shop.refund_awaiting_confirmation()
            read, gate = hold(shop.h.ledger, "plan_items")
            await shop.h.crash_and_restart()
            await until(read.is_set, "the restarted run read its plan")
            result = await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
            assert result.confirmed_keys == [shop.key(paid)]
            gate.set()

            # Without it the run would wait out the hour-long confirmation
            # deadline and send the refund again.
            record = await shop.h.settle(record.rollback_id, max_fake_seconds=60)
            assert record.state == RollbackState.COMPLETED
            assert len(shop.calls) == 1

    async def test_a_confirmation_whose_commit_went_unseen_is_told_on_the_retry(self) -> None:
        # The tracker's write committed, but the connection was lost before
        # the COMMIT was acknowledged: the tracker retries, the events are
        # duplicates by then, and the engine must hear of the confirmation
        # all the same (its runs' polls leave out what it is told).
        async with Shop(confirm_payment=True, confirm_timeout=3600.0) as shop:
            paid, record = await shop.refund_awaiting_confirmation()
            ledger = shop.h.ledger
            track = ledger.track
            unseen: list[TrackResult] = []

            async def commit_then_lose_the_connection(*args: Any, **kwargs: Any) -> TrackResult:
                result = await track(*args, **kwargs)
                if not unseen:
                    unseen.append(result)
                    raise ConnectionError("connection lost at COMMIT")
                return result

            ledger.track = commit_then_lose_the_connection  # type: ignore[method-assign]
            tracker = Tracker(
                Settings(),
                ledger=ledger,
                engine=shop.h.engine,
                decoder=EventDecoder(shop.h.registry),
                dead_letters=None,  # type: ignore[arg-type]  # no bad records here
                clock=shop.h.clock,
            )
            refunded = shop.h.envelope(
                "PaymentRefunded", {}, deployment_id="payments-2", causation_id=shop.key(paid)
            )
            result = await tracker._store([tracked(refunded)], [])

            assert unseen[0].confirmed_keys == [shop.key(paid)]  # the lost write confirmed it
            assert result.duplicates == 1
            assert result.confirmed_keys == [shop.key(paid)]  # and the retry tells it again
            await shop.h.engine.on_tracked(result)
            record = await shop.h.settle(record.rollback_id, max_fake_seconds=60)
            assert record.state == RollbackState.COMPLETED
            assert len(shop.calls) == 1

    @pytest.mark.parametrize("lands", ["before the claim", "after the claim"])
    async def test_a_confirmation_told_while_the_run_claims_is_kept(self, lands: str) -> None:
        # A worker dies while the refund's handler runs: its claim is released
        # on restart and the compensation is pending again. The service got
        # the command and confirms while the restarted run writes its claim;
        # the poll leaves that confirmation out, so the run must keep it.
        async with Shop(confirm_payment=True, confirm_timeout=3600.0) as shop:
            paid = await shop.captured_payment()
            shop.gates[paid.event_id] = asyncio.Event()
            record = await shop.h.rollback(DEPLOYMENT, settle=False)
            await until(lambda: len(shop.h.sent) == 1, "refund sent")
            claiming, gate = hold(
                shop.h.ledger, "claim", before_the_call=lands == "before the claim"
            )
            await shop.h.crash_and_restart()
            await until(claiming.is_set, "the restarted run claims the refund")
            result = await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
            assert result.confirmed_keys == [shop.key(paid)]
            gate.set()

            # Without it the run would hold the refund as running for ever (or
            # run it again and wait out the hour-long confirmation deadline).
            record = await shop.h.settle(record.rollback_id, max_fake_seconds=60)
            assert record.state == RollbackState.COMPLETED
            assert len(shop.calls) == 1
            assert await shop.state_of(paid) == S.CONFIRMED

    async def test_a_confirmation_recorded_before_the_run_started_is_read(self) -> None:
        # The tracker records a confirmation between the plan's save and the
        # run's start: its engine has no run to tell yet, and the run takes
        # the plan as saved. The claim finds the refund done; the run must
        # read why instead of waiting for a poll that leaves it out.
        async with Shop(confirm_payment=True, confirm_timeout=3600.0) as shop:
            paid = await shop.captured_payment()
            save_plan = shop.h.ledger.save_plan

            async def save_then_confirm(*args: Any, **kwargs: Any) -> Any:
                stored = await save_plan(*args, **kwargs)
                refunded = shop.h.envelope(
                    "PaymentRefunded", {}, deployment_id="payments-2", causation_id=shop.key(paid)
                )
                assert (await shop.h.emit(refunded)).confirmed_keys == [shop.key(paid)]
                return stored

            shop.h.ledger.save_plan = save_then_confirm  # type: ignore[method-assign]
            record = await shop.h.rollback(DEPLOYMENT, settle=False)
            record = await shop.h.settle(record.rollback_id, max_fake_seconds=60)

            assert record.state == RollbackState.COMPLETED
            assert shop.calls == []
            assert await shop.state_of(paid) == S.CONFIRMED

    async def test_a_confirmation_told_while_the_timeout_is_written_is_kept(self) -> None:
        # The deadline passes and the run records it (applied -> pending); the
        # late confirmation lands right after, before the run hears back.
        async with Shop(confirm_payment=True, confirm_timeout=10.0) as shop:
            paid, record = await shop.refund_awaiting_confirmation()
            expiring, gate = hold(shop.h.ledger, "expire_confirmations")
            await shop.h.clock.advance(10)
            await until(expiring.is_set, "the timeout is written")
            assert await shop.state_of(paid) == S.PENDING
            result = await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
            assert result.confirmed_keys == [shop.key(paid)]
            gate.set()

            record = await shop.h.settle(record.rollback_id, max_fake_seconds=60)
            assert record.state == RollbackState.COMPLETED
            assert len(shop.calls) == 1
            assert await shop.state_of(paid) == S.CONFIRMED


# ------------------------------------------------------------------- pause


class TestPause:
    async def stock_release_in_flight(
        self, shop: Shop
    ) -> tuple[EventEnvelope, EventEnvelope, EventEnvelope, str]:
        """One checkout rolled back: its first compensation (the stock release)
        in flight and held by a gate, the two others pending."""
        order, payment, stock = await shop.checkout("c1")
        shop.gates[stock.event_id] = asyncio.Event()
        record = await shop.h.rollback(DEPLOYMENT, settle=False)
        await until(lambda: len(shop.h.sent) == 1, "first compensation in flight")
        return order, payment, stock, record.rollback_id

    async def test_pause_stops_new_starts_and_resume_continues(self) -> None:
        async with Shop() as shop:
            order, payment, stock, rollback_id = await self.stock_release_in_flight(shop)

            await shop.h.engine.pause(rollback_id)
            # The in-flight compensation finishes; nothing new starts.
            shop.gates[stock.event_id].set()
            await until(lambda: not shop.h.engine.running(), "the run stops")
            await shop.h.clock.advance(600)
            await asyncio.sleep(0.01)
            assert [c.event_id for c in shop.calls] == [stock.event_id]
            assert await shop.state_of(stock) == S.APPLIED
            assert await shop.state_of(payment) == S.PENDING
            assert (await shop.h.ledger.require_rollback(rollback_id)).state == RollbackState.PAUSED
            with pytest.raises(LedgerError, match="not running"):
                await shop.h.engine.pause(rollback_id)

            await shop.h.engine.resume_rollback(rollback_id)
            record = await shop.h.settle(rollback_id)

            assert record.state == RollbackState.COMPLETED
            assert shop.sent_order() == [stock.event_id, payment.event_id, order.event_id]
            # Nothing ran twice.
            assert [c.event_id for c in shop.calls] == shop.sent_order()
            assert shop.h.statuses.states(rollback_id) == [
                RollbackState.ACCEPTED,
                RollbackState.PLANNING,
                RollbackState.RUNNING,
                RollbackState.PAUSED,
                RollbackState.RUNNING,
                RollbackState.COMPLETED,
            ]

    async def test_a_resume_before_the_paused_run_has_ended_runs_the_rest(self) -> None:
        """Resumed while the paused run still waits for its compensation in
        flight: that run ends as paused, and a new one takes over at once
        (not only at the worker's next reconcile, which a harness has not)."""
        async with Shop() as shop:
            order, payment, stock, rollback_id = await self.stock_release_in_flight(shop)

            await shop.h.engine.pause(rollback_id)
            await shop.h.engine.resume_rollback(rollback_id)
            shop.gates[stock.event_id].set()
            record = await asyncio.wait_for(shop.h.settle(rollback_id), timeout=10)

            assert record.state == RollbackState.COMPLETED
            assert shop.sent_order() == [stock.event_id, payment.event_id, order.event_id]
            assert [c.event_id for c in shop.calls] == shop.sent_order()

    async def test_resume_of_a_completed_rollback_is_refused(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            record = await shop.h.rollback(DEPLOYMENT)
            with pytest.raises(LedgerError, match="not paused or failed"):
                await shop.h.engine.resume_rollback(record.rollback_id)


# ------------------------------------------------------------------ upcasting


class ParcelShippedV3(BaseModel):
    __event_type__ = "ParcelShipped"
    __schema_version__ = 3

    parcel_id: str
    carrier: str
    weight_grams: int


def _shipping_saga(calls: list[tuple[Any, CompensationContext]]) -> Saga:
    shipping = Saga("shipping")

    @shipping.compensate(ParcelShippedV3)
    async def recall_parcel(event: ParcelShippedV3, ctx: CompensationContext) -> None:
        calls.append((event, ctx))
        await ctx.send("shipping.commands", {"recall": event.parcel_id})

    @shipping.upcaster("ParcelShipped", from_version=1)
    def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
        # v2 split "parcel" into id and carrier.
        parcel_id, carrier = payload["parcel"].split("@")
        return {"parcel_id": parcel_id, "carrier": carrier, "weight_kg": payload["weight_kg"]}

    @shipping.upcaster("ParcelShipped", from_version=2)
    def v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
        # v3 measures in grams.
        rest = {k: v for k, v in payload.items() if k != "weight_kg"}
        return {**rest, "weight_grams": round(payload["weight_kg"] * 1000)}

    return shipping


class TestUpcasting:
    async def test_v1_payload_is_upcast_to_v3_before_the_handler_runs(self) -> None:
        calls: list[tuple[Any, CompensationContext]] = []
        async with SagaTestHarness(_shipping_saga(calls)) as h:
            v1 = h.envelope(
                "ParcelShipped",
                {"parcel": "p-7@dhl", "weight_kg": 1.25},
                deployment_id="shipping-3.1",
                schema_version=1,
            )
            v2 = h.envelope(
                "ParcelShipped",
                {"parcel_id": "p-8", "carrier": "ups", "weight_kg": 0.5},
                deployment_id="shipping-3.1",
                schema_version=2,
            )
            await h.emit(v1, v2)
            record = await h.rollback("shipping-3.1")

            assert record.state == RollbackState.COMPLETED
            by_id = {ctx.envelope.event_id: event for event, ctx in calls}
            assert by_id[v1.event_id] == ParcelShippedV3(
                parcel_id="p-7", carrier="dhl", weight_grams=1250
            )
            assert by_id[v2.event_id] == ParcelShippedV3(
                parcel_id="p-8", carrier="ups", weight_grams=500
            )
            # The envelope is what was emitted; only the handler's argument is upcast.
            (ctx,) = [ctx for _, ctx in calls if ctx.envelope.event_id == v1.event_id]
            assert ctx.envelope.schema_version == 1
            assert ctx.envelope.payload == {"parcel": "p-7@dhl", "weight_kg": 1.25}

    async def test_a_payload_the_upcasters_cannot_handle_fails_without_retrying(self) -> None:
        calls: list[tuple[Any, CompensationContext]] = []
        async with SagaTestHarness(_shipping_saga(calls)) as h:
            broken = h.envelope(
                "ParcelShipped", {"weight_kg": 1}, deployment_id="shipping-3.1", schema_version=1
            )
            await h.emit(broken)
            record = await h.rollback("shipping-3.1")
            assert record.state == RollbackState.FAILED
            assert calls == []
            (failure,) = h.failures.failed
            assert "cannot build the handler's input" in failure[2]
            assert "upcaster of ParcelShipped from v1 failed" in failure[2]
            stored = await h.ledger.get_compensation(failure[1])
            assert stored is not None
            assert stored.attempts == 1

    async def test_a_missing_upcaster_makes_the_event_uncovered_at_plan_time(self) -> None:
        shipping = Saga("shipping")

        @shipping.compensate(ParcelShippedV3)
        async def recall_parcel(event: ParcelShippedV3, ctx: CompensationContext) -> None:
            raise AssertionError("must not run for an event it cannot read")

        @shipping.upcaster("ParcelShipped", from_version=2)
        def v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
            return payload

        async with SagaTestHarness(shipping) as h:
            old = h.envelope(
                "ParcelShipped", {"parcel": "p@x"}, deployment_id="shipping-3.1", schema_version=1
            )
            await h.emit(old)
            record = await h.rollback("shipping-3.1")

            assert record.state == RollbackState.COMPLETED_WITH_WARNINGS
            assert h.sent == []
            (note,) = record.uncovered
            assert note["event_id"] == old.event_id
            assert note["kind"] == "uncovered"
            assert note["detail"] == (
                "ParcelShipped v1 cannot reach v3: saga 'shipping' has no upcaster from v1"
            )
            status = await h.engine.status_of(record.rollback_id)
            assert (status.planned, status.uncovered) == (0, 1)


# ------------------------------------------------------------------- signals


class TestSignals:
    async def test_dry_run_plans_and_sends_nothing(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            await shop.h.emit(shop.event("ReceiptEmailed", correlation_id="c1"))
            record = await shop.h.rollback(DEPLOYMENT, dry_run=True)

            assert record.state == RollbackState.PLANNED
            assert record.dry_run
            assert shop.calls == []
            assert shop.h.sent == []
            assert shop.h.engine.running() == []
            items = await shop.h.compensations(record.rollback_id)
            assert [i.state for i in items] == [S.PENDING] * 3
            status = await shop.h.engine.status_of(record.rollback_id)
            assert (status.planned, status.manual, status.dry_run) == (3, 1, True)
            assert shop.h.statuses.states(record.rollback_id) == [
                RollbackState.ACCEPTED,
                RollbackState.PLANNING,
                RollbackState.PLANNED,
            ]
            # A dry run does not spoil a real one.
            real = await shop.h.rollback(DEPLOYMENT)
            assert real.state == RollbackState.COMPLETED_WITH_WARNINGS
            assert len(shop.h.sent) == 3

    async def test_duplicate_signal_is_one_rollback(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            signal = shop.h.signal(DEPLOYMENT, signal_id="sig-1")
            first = await shop.h.engine.handle_signal(signal)
            again = await shop.h.engine.handle_signal(signal)  # while the first runs
            assert again.rollback_id == first.rollback_id == "sig-1"
            await shop.h.settle("sig-1")
            third = await shop.h.engine.handle_signal(signal)  # after it finished

            assert third.state == RollbackState.COMPLETED
            assert len(shop.h.sent) == 3
            assert len(shop.calls) == 3
            assert [r.rollback_id for r in await shop.h.ledger.list_rollbacks()] == ["sig-1"]
            assert shop.h.statuses.states("sig-1").count(RollbackState.ACCEPTED) == 1

    async def test_two_signals_for_the_same_events_compensate_once(self) -> None:
        async with Shop() as shop:
            events = await shop.checkout("c1")
            first = await shop.h.rollback(DEPLOYMENT)
            second = await shop.h.rollback(DEPLOYMENT)

            assert first.rollback_id != second.rollback_id
            assert first.state == second.state == RollbackState.COMPLETED
            assert len(shop.calls) == 3
            assert len(shop.h.sent) == 3
            # The second rollback reports the work as done, not as its own.
            status = await shop.h.engine.status_of(second.rollback_id)
            assert (status.planned, status.applied) == (3, 3)
            assert [await shop.state_of(e) for e in events] == [S.APPLIED] * 3

    async def test_two_concurrent_signals_compensate_once(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            await shop.checkout("c2")
            first = await shop.h.rollback(DEPLOYMENT, settle=False)
            by_service = await shop.h.rollback(
                settle=False, service="orders", service_version="1.0"
            )
            await shop.h.settle(first.rollback_id)
            second = await shop.h.settle(by_service.rollback_id)

            assert second.deployment_id == DEPLOYMENT
            assert second.state == RollbackState.COMPLETED
            assert (await shop.h.ledger.require_rollback(first.rollback_id)).state == (
                RollbackState.COMPLETED
            )
            assert len(shop.calls) == 6
            assert sorted(c.key for c in shop.calls) == sorted({c.key for c in shop.calls})

    async def test_a_rollback_sees_the_outcome_of_a_claim_another_rollback_holds(self) -> None:
        # A run's own claims and outcomes mark nothing changed for the polls
        # of other runs (`changed_at`): the second rollback learns of the
        # first one's claim when its own claim finds the key taken, and must
        # then read that key itself until its outcome lands.
        async with Shop() as shop:
            _, _, reserved = await shop.checkout("c1")
            shop.gates[reserved.event_id] = asyncio.Event()
            first = await shop.h.rollback(DEPLOYMENT, settle=False)
            await wait_for(lambda: len(shop.calls) == 1, timeout=10, message="first claim")
            second = await shop.h.rollback(DEPLOYMENT, settle=False)

            def second_waits() -> bool:
                run = shop.h.engine._runs.get(second.rollback_id)
                return run is not None and run.idle

            await wait_for(second_waits, timeout=10, message="the second run waiting")
            shop.gates[reserved.event_id].set()
            done = [
                await shop.h.settle(r.rollback_id, max_fake_seconds=60) for r in (first, second)
            ]

            assert [r.state for r in done] == [RollbackState.COMPLETED] * 2
            assert sorted(c.key for c in shop.calls) == sorted({c.key for c in shop.calls})
            assert len(shop.calls) == 3

    async def test_unknown_deployment_is_rejected_with_a_clear_error(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            record = await shop.h.rollback("nope-9.9")
            assert record.state == RollbackState.REJECTED
            assert record.error == (
                "unknown deployment: no events were ever tracked for deployment 'nope-9.9'"
            )
            by_service = await shop.h.rollback(service="nope", service_version="9.9")
            assert by_service.state == RollbackState.REJECTED
            assert by_service.error is not None
            assert "service 'nope' version '9.9'" in by_service.error
            assert shop.h.sent == []
            last = shop.h.statuses.records[-1]
            assert (last.state, last.error) == (RollbackState.REJECTED, by_service.error)

    async def test_a_window_without_events_is_rejected(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            later = shop.h.clock.now() + timedelta(hours=2)
            record = await shop.h.rollback(DEPLOYMENT, since=later)
            assert record.state == RollbackState.REJECTED
            assert record.error is not None
            assert "no tracked events between the window's bounds" in record.error

    async def test_guard_rejects_a_large_rollback_unless_forced(self) -> None:
        async with Shop(settings=EngineSettings(max_compensations=2)) as shop:
            await shop.checkout("c1")
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.REJECTED
            assert record.error is not None
            assert "3 compensations" in record.error
            assert "BACKOUT_MAX_COMPENSATIONS=2" in record.error
            assert "force" in record.error
            assert shop.h.sent == []

            forced = await shop.h.rollback(DEPLOYMENT, force=True)
            assert forced.state == RollbackState.COMPLETED
            assert len(shop.h.sent) == 3

    async def test_guard_counts_compensations_not_events(self) -> None:
        async with Shop(settings=EngineSettings(max_compensations=1)) as shop:
            await shop.h.emit(
                shop.event("OrderPlaced"), shop.event("OrderViewed"), shop.event("ReceiptEmailed")
            )
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.COMPLETED_WITH_WARNINGS

    async def test_status_sequence_of_a_clean_rollback(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            record = await shop.h.rollback(DEPLOYMENT)
            assert shop.h.statuses.states(record.rollback_id) == [
                RollbackState.ACCEPTED,
                RollbackState.PLANNING,
                RollbackState.RUNNING,
                RollbackState.COMPLETED,
            ]
            final = shop.h.statuses.records[-1]
            assert (final.planned, final.applied, final.error) == (3, 3, None)
            assert final.deployment_id == DEPLOYMENT

    async def test_compensations_start_before_the_broker_has_the_first_records(self) -> None:
        # `accepted`, `planning`, `running` and progress records are sent
        # without waiting for the broker; they still arrive in order, the
        # final record last.
        async with Shop() as shop:
            held = HeldStatus()
            shop.h.statuses = held
            shop.h.engine.status = held
            await shop.checkout("c1")
            # Waiting for the broker to take `accepted` would wait for the gate.
            record = await asyncio.wait_for(shop.h.rollback(DEPLOYMENT, settle=False), 10)
            await wait_for(lambda: len(shop.h.sent) == 3, message="all three commands sent")
            assert held.records == []
            assert held.waiting == 1  # the others queue behind `accepted`
            held.gate.set()
            record = await shop.h.settle(record.rollback_id)
            assert record.state == RollbackState.COMPLETED
            assert held.states(record.rollback_id) == [
                RollbackState.ACCEPTED,
                RollbackState.PLANNING,
                RollbackState.RUNNING,
                RollbackState.COMPLETED,
            ]

    async def test_a_record_that_cannot_be_sent_does_not_stop_the_rollback(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        async with Shop() as shop:
            failing = HeldStatus(fail={RollbackState.PLANNING})
            failing.gate.set()
            shop.h.statuses = failing
            shop.h.engine.status = failing
            await shop.checkout("c1")
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.COMPLETED
            assert failing.states(record.rollback_id) == [
                RollbackState.ACCEPTED,
                RollbackState.RUNNING,
                RollbackState.COMPLETED,
            ]
            assert "a status record was not sent: broker away" in caplog.text

    async def test_progress_counts_of_a_run_are_the_ledger_counts(self) -> None:
        # Progress records count the plan from the run's memory (counting a
        # large plan in the ledger is slow); they must say what the ledger says.
        async with Shop(confirm_payment=True) as shop:
            _, bad_payment, _ = await shop.checkout("c-bad")
            good_order, good_payment, _ = await shop.checkout("c-good")
            await shop.h.emit(shop.event("ReceiptEmailed", correlation_id="c-good"))
            shop.script[bad_payment.event_id] = [PermanentError("refund refused")]
            shop.gates[good_order.event_id] = asyncio.Event()
            record = await shop.h.rollback(DEPLOYMENT, settle=False)

            async def run_counts_then_ledger_counts() -> tuple[Counts, Counts]:
                run = shop.h.engine._runs[record.rollback_id]
                latest = await shop.h.ledger.require_rollback(record.rollback_id)
                ours = run.counts(manual=len(latest.manual), uncovered=len(latest.uncovered))
                return ours, await shop.h.ledger.counts(record.rollback_id)

            # Stock undone, one refund failed (its order blocked), one awaiting its confirmation.
            await shop.until_state(bad_payment, S.FAILED)
            await shop.until_state(good_payment, S.APPLIED)
            ours, ledger = await run_counts_then_ledger_counts()
            assert ours == ledger
            assert (ledger.planned, ledger.applied, ledger.failed, ledger.manual) == (6, 3, 1, 1)
            assert (ledger.blocked, ledger.pending, ledger.confirmed) == (1, 1, 0)

            # Confirmed: the good order's handler runs (held in it by the gate).
            await shop.h.confirm(shop.sent_for(good_payment)[0], "PaymentRefunded")
            await shop.until_state(good_order, S.RUNNING)
            ours, ledger = await run_counts_then_ledger_counts()
            assert ours == ledger
            assert (ledger.confirmed, ledger.running, ledger.pending) == (1, 1, 0)

            shop.gates[good_order.event_id].set()
            assert (await shop.h.settle(record.rollback_id)).state == RollbackState.FAILED

    async def test_status_sequence_with_manual_actions_ends_with_warnings(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            emailed = shop.event("ReceiptEmailed", correlation_id="c1")
            await shop.h.emit(emailed, shop.event("OrderViewed", correlation_id="c1"))
            record = await shop.h.rollback(DEPLOYMENT)

            assert shop.h.statuses.states(record.rollback_id) == [
                RollbackState.ACCEPTED,
                RollbackState.PLANNING,
                RollbackState.RUNNING,
                RollbackState.COMPLETED_WITH_WARNINGS,
            ]
            final = shop.h.statuses.records[-1]
            assert (final.applied, final.manual, final.uncovered) == (3, 1, 0)
            # Counted from the plan as planned, without the ledger: the same counts.
            running = next(r for r in shop.h.statuses.records if r.state == RollbackState.RUNNING)
            assert (running.planned, running.applied, running.manual, running.uncovered) == (
                3,
                0,
                1,
                0,
            )
            (note,) = record.manual
            assert note["event_id"] == emailed.event_id
            assert note["detail"] == "Apologise to the customer by e-mail"


# ------------------------------------------------------------- stop / restart


class TestStopAndRestart:
    async def test_stop_never_cuts_a_ledger_transaction_and_the_restart_finishes(self) -> None:
        # Stopping runs (shutdown, a rebalance) must not cancel a ledger call
        # half-way: on SQLite that leaves the database locked for everyone.
        async with Shop() as shop:
            events = [e for c in range(6) for e in await shop.checkout(f"c{c}")]
            cut: list[str] = []
            ledger = shop.h.ledger
            names = [
                "claim",
                "record_outcomes",
                "release_claims",
                "set_states",
                "plan_items",
                "get_compensations",
                "get_rollback",
                "counts",
            ]

            def watched(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
                async def call(*args: Any, **kwargs: Any) -> Any:
                    try:
                        return await method(*args, **kwargs)
                    except asyncio.CancelledError:
                        cut.append(name)
                        raise

                return call

            for name in names:
                setattr(ledger, name, watched(name, getattr(ledger, name)))
            record = await shop.h.rollback(DEPLOYMENT, settle=False)
            restarts: list[tuple[int, set[str]]] = []  # (calls so far, keys recorded done)
            for pause in [0.0, 0.001, 0.002, 0.0005, 0.003, 0.0, 0.001, 0.004]:
                await asyncio.sleep(pause)
                await shop.h.engine.stop()
                states = await ledger.compensation_states(shop.key(e) for e in events)
                restarts.append((len(shop.calls), {k for k, v in states.items() if v in DONE}))
                await shop.h.crash_and_restart()
            record = await shop.h.settle(record.rollback_id)

            assert cut == []
            for calls_before, done in restarts:
                # Nothing recorded done before a restart ran again after it.
                assert not {c.key for c in shop.calls[calls_before:]} & done
            assert record.state == RollbackState.COMPLETED
            assert {c.key for c in shop.calls} == {shop.key(e) for e in events}
            assert {await shop.state_of(e) for e in events} == {S.APPLIED}
            # Each instance still undone in reverse order, re-runs included.
            for c in range(6):
                mine = [e.event_id for e in events if e.correlation_id == f"c{c}"]
                sent = [x for x in shop.sent_order() if x in mine]
                assert list(dict.fromkeys(sent)) == list(reversed(mine))

    async def test_a_stopped_rollback_stays_running_for_the_next_worker(self) -> None:
        async with Shop() as shop:
            order, payment, stock = await shop.checkout("c1")
            shop.gates[stock.event_id] = asyncio.Event()
            record = await shop.h.rollback(DEPLOYMENT, settle=False)
            await until(lambda: len(shop.h.sent) == 1, "first compensation in flight")

            await shop.h.engine.stop()
            assert shop.h.engine.running() == []
            stored = await shop.h.ledger.require_rollback(record.rollback_id)
            assert stored.state == RollbackState.RUNNING
            # The handler in flight was abandoned: its claim is still open.
            assert await shop.state_of(stock) == S.RUNNING

            await shop.h.crash_and_restart()
            shop.gates[stock.event_id].set()
            record = await shop.h.settle(record.rollback_id)
            assert record.state == RollbackState.COMPLETED
            # At least once, same key: the abandoned attempt ran again (it
            # counts against the retry budget: it may have been what crashed).
            assert [(c.key, c.attempt) for c in shop.calls_of(stock)] == [
                (shop.key(stock), 1),
                (shop.key(stock), 2),
            ]
            assert [c.event_id for c in shop.calls[2:]] == [payment.event_id, order.event_id]


# ------------------------------------------------------------- tracking catch-up


class Tracking:
    """Stands in for the worker's tracker: records the waits and runs `meanwhile`."""

    def __init__(self, answer: bool | Exception, meanwhile: Any = None) -> None:
        self.answer = answer
        self.meanwhile = meanwhile
        self.waits: list[float] = []

    async def caught_up(self, timeout: float) -> bool:
        self.waits.append(timeout)
        if self.meanwhile is not None:
            await self.meanwhile()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class TestTrackingCatchUp:
    async def test_the_blast_radius_is_read_once_tracking_has_caught_up(self) -> None:
        async with Shop(settings=EngineSettings(catch_up_seconds=7)) as shop:
            await shop.checkout("c1")
            # Tracked while the signal waits: part of the plan, not late.
            overtaken = shop.event("OrderPlaced", correlation_id="c2")
            tracking = Tracking(True, meanwhile=lambda: shop.h.emit(overtaken))
            shop.h.engine.tracking = tracking
            record = await shop.h.rollback(DEPLOYMENT)

            assert tracking.waits == [7]
            assert record.state == RollbackState.COMPLETED
            status = await shop.h.engine.status_of(record.rollback_id)
            assert (status.planned, status.applied, status.late) == (4, 4, 0)

    @pytest.mark.parametrize("answer", [False, ConnectionError("broker away")])
    async def test_tracking_behind_plans_with_what_is_tracked(
        self, answer: bool | Exception, caplog: pytest.LogCaptureFixture
    ) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            shop.h.engine.tracking = Tracking(answer)
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.COMPLETED
            assert len(shop.h.sent) == 3
            assert any("tracking did not catch up" in r.getMessage() for r in caplog.records), (
                caplog.text
            )

    @pytest.mark.parametrize("answer", [True, False])
    async def test_the_wait_is_measured(self, answer: bool) -> None:
        """The worker's observer gets each wait (`backout_tracking_catch_up_seconds`)."""
        async with Shop() as shop:
            await shop.checkout("c1")
            shop.h.engine.tracking = Tracking(answer)
            observer = PrometheusObserver()
            shop.h.engine.observer = observer
            labels = {"caught_up": str(answer).lower()}
            name = "backout_tracking_catch_up_seconds_count"
            before = REGISTRY.get_sample_value(name, labels) or 0.0
            await shop.h.rollback(DEPLOYMENT)
            assert REGISTRY.get_sample_value(name, labels) == before + 1

    async def test_no_wait_when_it_is_turned_off(self) -> None:
        async with Shop(settings=EngineSettings(catch_up_seconds=0)) as shop:
            await shop.checkout("c1")
            tracking = Tracking(False)
            shop.h.engine.tracking = tracking
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.COMPLETED
            assert tracking.waits == []


# ------------------------------------------------------------------- late events


class TestLateEvents:
    async def test_an_event_emitted_after_the_rollback_completed_is_compensated(self) -> None:
        async with Shop() as shop:
            await shop.checkout("c1")
            record = await shop.h.rollback(DEPLOYMENT)
            assert record.state == RollbackState.COMPLETED
            assert len(shop.h.sent) == 3

            # Traffic still draining from the bad pods.
            straggler = shop.event("OrderPlaced", correlation_id="c9")
            await shop.h.emit(straggler)
            record = await shop.h.settle(record.rollback_id)

            assert record.state == RollbackState.COMPLETED
            assert shop.sent_order()[-1] == straggler.event_id
            assert await shop.state_of(straggler) == S.APPLIED
            status = await shop.h.engine.status_of(record.rollback_id)
            assert (status.planned, status.applied, status.late) == (4, 4, 1)

    async def test_a_late_effect_in_another_service_is_compensated(self) -> None:
        async with Shop() as shop:
            (placed, *_) = await shop.checkout("c1")
            record = await shop.h.rollback(DEPLOYMENT)
            # Payments (a healthy deployment) reacts late to the rolled-back order.
            late_payment = shop.healthy_payment(caused_by=placed)
            unrelated = shop.healthy_payment()
            await shop.h.emit(late_payment, unrelated)
            record = await shop.h.settle(record.rollback_id)

            assert await shop.state_of(late_payment) == S.APPLIED
            assert shop.calls_of(unrelated) == []
            assert (await shop.h.engine.status_of(record.rollback_id)).late == 1

    @pytest.mark.parametrize(
        "between", ["ReceiptEmailed", "OrderViewed"], ids=["manual", "ignored"]
    )
    async def test_a_late_event_caused_through_an_uncompensated_one_is_compensated(
        self, between: str
    ) -> None:
        """Mail (manual) or a page view (ignored) reacts late to the rolled-back
        order, and payments reacts to that in a later batch: the blast radius
        runs through events that are no plan item, as it does when planned."""
        async with Shop() as shop:
            (placed, *_) = await shop.checkout("c1")
            record = await shop.h.rollback(DEPLOYMENT)
            reaction = shop.event(between, deployment_id="mail-1.0", causation_id=placed.event_id)
            elsewhere = shop.event(between, deployment_id="mail-1.0")
            await shop.h.emit(reaction, elsewhere)
            grandchild = shop.healthy_payment(caused_by=reaction)
            unrelated = shop.healthy_payment(caused_by=elsewhere)
            await shop.h.emit(grandchild, unrelated)
            record = await shop.h.settle(record.rollback_id)

            assert await shop.state_of(grandchild) == S.APPLIED
            assert shop.calls_of(unrelated) == []
            assert (await shop.h.engine.status_of(record.rollback_id)).late == 1

    async def late_child_of_a_waiting_parent(
        self, shop: Shop
    ) -> tuple[EventEnvelope, EventEnvelope, EventEnvelope, RollbackRecord]:
        """An order planned with its payment: the cancel waits for the refund's
        confirmation. Then inventory's reaction to the order is tracked late;
        its release fails once (a retry in 1 s)."""
        placed = shop.event("OrderPlaced", correlation_id="c1")
        paid = shop.event(
            "PaymentCaptured",
            correlation_id="c1",
            causation_id=placed.event_id,
            service="payments",
        )
        await shop.h.emit(placed, paid)
        record = await shop.h.rollback(DEPLOYMENT, settle=False)
        await until(lambda: len(shop.h.sent) == 1, "refund sent")
        await shop.until_state(paid, S.APPLIED)
        reserved = shop.event(
            "StockReserved",
            deployment_id="inventory-3.0",
            service="inventory",
            correlation_id="c1",
            causation_id=placed.event_id,
        )
        shop.script[reserved.event_id] = [ConnectionError("inventory down")]
        return placed, paid, reserved, record

    @pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
    async def test_a_late_child_is_undone_before_its_planned_parent(self, restart: bool) -> None:
        async with Shop(confirm_payment=True, confirm_timeout=3600.0) as shop:
            placed, paid, reserved, record = await self.late_child_of_a_waiting_parent(shop)
            await shop.h.emit(reserved)
            if restart:  # the run that reads everything again orders it the same
                await shop.h.crash_and_restart()
            await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
            record = await shop.h.settle(record.rollback_id)

            assert record.state == RollbackState.COMPLETED
            assert [(c.event_id, c.attempt) for c in shop.calls if c.event_id != paid.event_id][
                -3:
            ] == [(reserved.event_id, 1), (reserved.event_id, 2), (placed.event_id, 1)]
            status = await shop.h.engine.status_of(record.rollback_id)
            assert (status.planned, status.late) == (3, 1)

    async def test_a_late_child_holds_its_parent_while_it_is_being_written(self) -> None:
        """The run hears of the late item before the ledger write that adds it:
        the parent, ready meanwhile, must not start."""
        async with Shop(confirm_payment=True, confirm_timeout=3600.0) as shop:
            placed, _paid, reserved, record = await self.late_child_of_a_waiting_parent(shop)
            shop.script.pop(reserved.event_id)
            reached, gate = hold(shop.h.ledger, "add_items", before_the_call=True)
            emitting = asyncio.create_task(shop.h.emit(reserved))
            await until(reached.is_set, "the late item being written")
            await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
            run = shop.h.engine._runs[record.rollback_id]
            await until(
                lambda: (run.idle and not run._wake.is_set()) or shop.calls_of(placed),
                "the run looked at what is ready",
            )
            assert shop.calls_of(placed) == []

            gate.set()
            await emitting
            record = await shop.h.settle(record.rollback_id)
            assert record.state == RollbackState.COMPLETED
            assert [c.event_id for c in shop.calls][-2:] == [reserved.event_id, placed.event_id]

    async def test_a_late_item_that_was_not_written_holds_nothing_up(self) -> None:
        async with Shop(confirm_payment=True, confirm_timeout=3600.0) as shop:
            placed, _paid, reserved, record = await self.late_child_of_a_waiting_parent(shop)
            add_items = shop.h.ledger.add_items

            async def ledger_away(*args: Any, **kwargs: Any) -> None:
                raise ConnectionError("ledger away")

            shop.h.ledger.add_items = ledger_away  # type: ignore[method-assign]
            with pytest.raises(ConnectionError):
                await shop.h.emit(reserved)
            shop.h.ledger.add_items = add_items  # type: ignore[method-assign]
            await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
            record = await asyncio.wait_for(shop.h.settle(record.rollback_id), timeout=10)

            assert record.state == RollbackState.COMPLETED
            assert await shop.state_of(placed) == S.APPLIED

    @pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
    async def test_late_items_whose_orders_disagree_do_not_wait_for_each_other(
        self, restart: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Clocks that disagree across services (an order stamped after the
        reservation it caused) make two orders of the same events disagree:
        the late items' own plan (two reservations, by time: `first` before
        `second`) and their ordering among the planned items (the order's
        children after it, so `second`, which it did not cause, comes first).
        Each alone is acyclic; together they would make the order, `first` and
        `second` wait for one another for ever. The run keeps the order it
        found first and says so."""
        async with Shop(confirm_payment=True, confirm_timeout=3600.0, settings=NO_POLLING) as shop:
            start = shop.h.clock.now()
            placed = shop.event(
                "OrderPlaced", correlation_id="c1", occurred_at=start + timedelta(seconds=3)
            )
            paid = shop.event(
                "PaymentCaptured",
                correlation_id="c1",
                causation_id=placed.event_id,
                service="payments",
                occurred_at=start + timedelta(seconds=4),
            )
            await shop.h.emit(placed, paid)
            record = await shop.h.rollback(DEPLOYMENT, settle=False)
            await until(lambda: len(shop.h.sent) == 1, "refund sent")
            await shop.until_state(paid, S.APPLIED)  # the cancel waits for its confirmation

            def reservation(at: int, **fields: Any) -> EventEnvelope:
                return shop.event(
                    "StockReserved",
                    service="inventory",
                    correlation_id="c1",
                    occurred_at=start + timedelta(seconds=at),
                    **fields,
                )

            first = reservation(1, causation_id=placed.event_id)
            second = reservation(2)
            with caplog.at_level(logging.WARNING, logger="sagas.executor"):
                await shop.h.emit(first, second)
                if restart:
                    await shop.h.crash_and_restart()
                await shop.h.confirm(shop.h.sent[0], "PaymentRefunded")
                record = await asyncio.wait_for(
                    shop.h.settle(record.rollback_id, max_fake_seconds=7200), timeout=10
                )

            assert record.state == RollbackState.COMPLETED
            undone = [c.event_id for c in shop.calls]
            assert sorted(undone) == sorted(e.event_id for e in (placed, paid, first, second))
            # What both orders agree on still holds: the payment and the
            # reservation it caused before the order; the late plan's own order.
            assert undone[-1] == placed.event_id
            assert undone.index(second.event_id) < undone.index(first.event_id)
            assert "contradicts" in caplog.text

    async def test_events_tracked_while_the_plan_is_made_are_compensated(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The blast radius is read, then the plan is stored: events tracked in
        between are in neither, and the rollback has no quarantine yet to be
        late for. They are held, and joined once the plan is stored."""
        async with Shop() as shop:
            (placed, *_) = await shop.checkout("c1")
            straggler = shop.event("OrderPlaced", correlation_id="c2")
            reaction = shop.healthy_payment(caused_by=placed)
            unrelated = shop.healthy_payment()
            save_plan = shop.h.ledger.save_plan

            async def tracked_meanwhile(*args: Any, **kwargs: Any) -> Any:
                await shop.h.emit(straggler, reaction, unrelated)
                return await save_plan(*args, **kwargs)

            monkeypatch.setattr(shop.h.ledger, "save_plan", tracked_meanwhile)
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.COMPLETED
            assert await shop.state_of(straggler) == S.APPLIED
            assert await shop.state_of(reaction) == S.APPLIED
            assert shop.calls_of(unrelated) == []
            status = await shop.h.engine.status_of(record.rollback_id)
            assert (status.planned, status.applied, status.late) == (5, 5, 2)
            assert shop.h.engine._held == {}

    async def test_events_held_for_a_rejected_plan_are_dropped(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with Shop(settings=EngineSettings(max_compensations=1)) as shop:
            await shop.checkout("c1")
            straggler = shop.event("OrderPlaced", correlation_id="c2")
            blast_radius = shop.h.engine.blast_radius

            async def tracked_meanwhile(signal: Any) -> Any:
                radius = await blast_radius(signal)
                await shop.h.emit(straggler)
                return radius

            monkeypatch.setattr(shop.h.engine, "blast_radius", tracked_meanwhile)
            record = await shop.h.rollback(DEPLOYMENT)

            assert record.state == RollbackState.REJECTED
            assert shop.h.engine._held == {}
            assert shop.h.sent == []

    @pytest.mark.parametrize("ledger_away", [False, True], ids=["ledger up", "ledger away once"])
    async def test_events_held_for_another_workers_plan_join_once_it_is_stored(
        self, ledger_away: bool
    ) -> None:
        """Another worker plans the rollback: this one holds what it tracks
        meanwhile and joins it when it next looks (a tracked batch, a
        reconcile); a ledger away then keeps them held for the next look."""
        async with Shop() as shop:
            (placed, *_) = await shop.checkout("c1")
            elsewhere = shop.h.engine
            signal = shop.h.signal(DEPLOYMENT)
            now = shop.h.clock.now()
            await shop.h.ledger.create_rollback(
                signal.signal_id,
                signal=signal.model_dump(mode="json"),
                deployment_id=DEPLOYMENT,
                dry_run=False,
                state=RollbackState.PLANNING,
                now=now,
            )
            # The other worker reads the blast radius; then the straggler is tracked here.
            _, plan = await elsewhere.plan(signal)
            straggler = shop.event("OrderPlaced", correlation_id="c2")
            await shop.h.emit(straggler)
            assert elsewhere._held == {signal.signal_id: {straggler.event_id}}
            assert shop.h.sent == []

            # The other worker stores its plan.
            await shop.h.ledger.save_plan(
                signal.signal_id,
                plan.new_compensations(),
                manual=[],
                uncovered=[],
                state=RollbackState.RUNNING,
                now=now,
                quarantine_until=now + timedelta(hours=1),
            )
            if ledger_away:
                events_by_id = shop.h.ledger.events_by_id

                async def away(*args: Any, **kwargs: Any) -> Any:
                    raise ConnectionError("ledger away")

                shop.h.ledger.events_by_id = away  # type: ignore[method-assign]
                with pytest.raises(ConnectionError):
                    await elsewhere.resume()
                assert elsewhere._held == {signal.signal_id: {straggler.event_id}}
                shop.h.ledger.events_by_id = events_by_id  # type: ignore[method-assign]
            await elsewhere.resume()
            record = await shop.h.settle(signal.signal_id)

            assert elsewhere._held == {}
            assert record.state == RollbackState.COMPLETED
            assert await shop.state_of(straggler) == S.APPLIED
            assert await shop.state_of(placed) == S.APPLIED

    async def test_no_late_compensation_after_the_quarantine_window(self) -> None:
        async with Shop(settings=EngineSettings(quarantine_seconds=60)) as shop:
            await shop.checkout("c1")
            record = await shop.h.rollback(DEPLOYMENT)
            await shop.h.clock.advance(61)
            await shop.h.emit(shop.event("OrderPlaced"))
            assert shop.h.engine.running() == []
            assert (await shop.h.engine.status_of(record.rollback_id)).late == 0
            assert len(shop.h.sent) == 3
