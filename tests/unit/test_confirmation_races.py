"""Confirmations racing a run's own ledger writes (hypothesis).

A worker's tracker tells its engine of each confirmation it records, and the
engine's runs leave those rows out of their polls (they were told). So no
write of the run's own — a claim, an outcome, an expiry, a blocking move, a
read of its plan — may overwrite a confirmation in memory, or the run waits
for ever (found by the crash-loop test: `CHANGELOG.md`, Fixed).

Here a service double answers the commands at random moments *inside* the
run's ledger calls (just before or just after the real call, chosen by
hypothesis), beside a background answerer, with workers restarted at random
points. Every rollback must end with everything confirmed, each order
cancelled only once its refund is confirmed.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagas.context import CompensationContext, SentCommand
from sagas.definition import Saga
from sagas.engine import EngineSettings
from sagas.ledger import CompensationState
from sagas.planner import idempotency_key
from sagas.retry import RetryPolicy
from sagas.testing import SagaTestHarness
from schemas.headers import IDEMPOTENCY_KEY_HEADER
from schemas.status import RollbackState
from tests.support.waiting import wait_for

BAD = "orders-2.0"
CONFIRMATION = {"orders.commands": "OrderCancelled", "payments.commands": "PaymentRefunded"}
# The run's ledger calls a confirmation may race with.
RACED = [
    "claim",
    "record_outcomes",
    "expire_confirmations",
    "set_states",
    "release_claims",
    "save_plan",
    "plan_items",
    "get_compensations",
    "changed_states",
]


@dataclass
class Services:
    """The orders and payments services: they confirm what they were sent."""

    harness: SagaTestHarness
    rng: random.Random
    # Handler calls, by idempotency key.
    calls: list[str] = field(default_factory=list)
    # The refund an order's cancellation waits for: order event id -> refund key.
    refund_of: dict[str, str] = field(default_factory=dict)
    # Orders cancelled while their refund was not confirmed in the ledger.
    early: list[str] = field(default_factory=list)
    answering: bool = False

    async def answer_some(self, chance: float) -> None:
        """Confirm each command sent so far with probability `chance`."""
        if self.answering:  # emitting reads the ledger too: no nested answers
            return
        self.answering = True
        try:
            for command in list(self.harness.sent):
                if self.rng.random() < chance:
                    await self.confirm(command)
        finally:
            self.answering = False

    async def confirm(self, command: SentCommand) -> None:
        key = command.header(IDEMPOTENCY_KEY_HEADER)
        result = await self.harness.confirm(command, CONFIRMATION[command.topic])
        assert set(result.confirmed_keys) <= {key}

    def racing(self, method: Callable[..., Awaitable[Any]], before: float, after: float) -> Any:
        """`method`, with answers given just before and just after it runs."""

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self.answer_some(before)
            result = await method(*args, **kwargs)
            await self.answer_some(after)
            return result

        return call


def checkout_saga(services: list[Services]) -> Saga:
    """Cancel the order (confirmed by OrderCancelled) after the refund (PaymentRefunded)."""
    saga = Saga("checkout")
    retry = RetryPolicy(max_attempts=1000, initial_delay=0.5, max_delay=2.0, jitter=0)

    @saga.compensate("OrderPlaced", retry=retry, confirm="OrderCancelled", confirm_timeout=5.0)
    async def cancel_order(event: Any, ctx: CompensationContext) -> None:
        me = services[0]
        me.calls.append(ctx.idempotency_key)
        refund = await me.harness.ledger.get_compensation(me.refund_of[ctx.envelope.event_id])
        if refund is None or refund.state != CompensationState.CONFIRMED:
            me.early.append(ctx.idempotency_key)
        await ctx.send("orders.commands", {"cancel": ctx.envelope.event_id})

    @saga.compensate("PaymentCaptured", retry=retry, confirm="PaymentRefunded", confirm_timeout=5.0)
    async def refund(event: Any, ctx: CompensationContext) -> None:
        services[0].calls.append(ctx.idempotency_key)
        await ctx.send("payments.commands", {"refund": ctx.envelope.event_id})

    return saga


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    instances=st.integers(1, 6),
    races=st.dictionaries(
        st.sampled_from(RACED),
        st.tuples(st.sampled_from([0.0, 0.3, 1.0]), st.sampled_from([0.0, 0.3, 1.0])),
        min_size=1,
    ),
    # Every command is answered in the end (liveness), sooner or later.
    background=st.sampled_from([0.05, 0.3, 1.0]),
    restarts=st.lists(st.integers(0, 12), max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_rollback_ends_whenever_its_confirmations_arrive(
    instances: int,
    races: dict[str, tuple[float, float]],
    background: float,
    restarts: list[int],
    seed: int,
) -> None:
    # A plain Random: answers are drawn while the run goes, and a
    # hypothesis-drawn one may not be used once its example is over.
    _run(_scenario(instances, races, background, restarts, random.Random(seed)))


def _run(scenario: Coroutine[Any, Any, None]) -> None:
    """`asyncio.run`, except that a task left over that does not end once
    cancelled fails the example with its stack instead of hanging the test
    (seen once in a full suite on a busy machine: pytest-timeout then showed
    only the threads)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario)
    finally:
        try:
            leftover = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in leftover:
                task.cancel()
            if leftover:
                _, stuck = loop.run_until_complete(asyncio.wait(leftover, timeout=30))
                if stuck:
                    stacks = io.StringIO()
                    for task in stuck:
                        task.print_stack(file=stacks)
                    raise AssertionError(
                        f"{len(stuck)} task(s) did not end within 30 s of being cancelled:\n"
                        f"{stacks.getvalue()}"
                    )
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


async def _scenario(
    instances: int,
    races: dict[str, tuple[float, float]],
    background: float,
    restarts: list[int],
    rng: random.Random,
) -> None:
    holder: list[Services] = []
    saga = checkout_saga(holder)
    async with SagaTestHarness(saga, settings=EngineSettings(poll_interval=1.0)) as harness:
        services = Services(harness, rng)
        holder.append(services)
        for i in range(instances):
            placed = harness.envelope(
                "OrderPlaced", {}, deployment_id=BAD, correlation_id=f"c{i}", service="orders"
            )
            paid = harness.envelope(
                "PaymentCaptured",
                {},
                deployment_id=BAD,
                correlation_id=f"c{i}",
                causation_id=placed.event_id,
                service="payments",
            )
            await harness.emit(placed, paid)
            services.refund_of[placed.event_id] = idempotency_key(paid.event_id, "checkout.refund")
        ledger = harness.ledger
        for name, (before, after) in races.items():
            setattr(ledger, name, services.racing(getattr(ledger, name), before, after))

        async def answer_in_the_background() -> None:
            while True:
                await asyncio.sleep(0.001)
                await services.answer_some(background)

        answering = asyncio.create_task(answer_in_the_background())
        try:
            record = await harness.rollback(BAD, settle=False)
            for calls in sorted(restarts):
                await wait_for(
                    lambda: len(services.calls) >= calls or not harness.engine.running(),  # noqa: B023
                    timeout=10,
                    interval=0.001,
                    message=f"{calls} handler calls",
                )
                await harness.crash_and_restart()
            # A run that lost a confirmation waits for ever: the budget runs out.
            record = await harness.settle(record.rollback_id, max_fake_seconds=600)
        finally:
            answering.cancel()

        assert record.state == RollbackState.COMPLETED, record.error
        items = await harness.compensations(record.rollback_id)
        assert len(items) == 2 * instances
        assert {i.state for i in items} == {CompensationState.CONFIRMED}
        assert set(services.calls) == {i.idempotency_key for i in items}
        assert services.early == []  # each order cancelled only after its refund
