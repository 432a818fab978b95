"""Retiring a rolled-back deployment ends its late-event quarantine."""

from __future__ import annotations

from typing import Any

from sagas import CompensationContext, Saga
from sagas.testing import SagaTestHarness

saga = Saga("retiring")


@saga.compensate("Placed")
async def cancel(event: dict[str, Any], ctx: CompensationContext) -> None:
    await ctx.send("orders.commands", {"cancel": event["id"]})


async def test_late_events_are_compensated_until_the_deployment_is_retired() -> None:
    async with SagaTestHarness(saga) as harness:
        await harness.emit(harness.envelope("Placed", {"id": 1}, deployment_id="orders-2"))
        record = await harness.rollback("orders-2")
        assert len(harness.sent) == 1

        await harness.emit(harness.envelope("Placed", {"id": 2}, deployment_id="orders-2"))
        late = await harness.settle(record.rollback_id)
        assert [c.json() for c in harness.sent] == [{"cancel": 1}, {"cancel": 2}]
        assert (await harness.engine.status_of(late.rollback_id)).late == 1

        closed = await harness.ledger.end_quarantine("orders-2", now=harness.clock.now())
        assert closed == [record.rollback_id]
        await harness.emit(harness.envelope("Placed", {"id": 3}, deployment_id="orders-2"))
        await harness.settle(record.rollback_id)
        assert len(harness.sent) == 2  # id 3 arrived after retirement: left alone
        assert await harness.ledger.end_quarantine("orders-2", now=harness.clock.now()) == []


async def test_retiring_one_deployment_leaves_others_quarantined() -> None:
    async with SagaTestHarness(saga) as harness:
        await harness.emit(
            harness.envelope("Placed", {"id": 1}, deployment_id="orders-2"),
            harness.envelope("Placed", {"id": 2}, deployment_id="orders-20"),
        )
        first = await harness.rollback("orders-2")
        second = await harness.rollback("orders-20")
        assert await harness.ledger.end_quarantine("orders-2", now=harness.clock.now()) == [
            first.rollback_id
        ]
        await harness.emit(harness.envelope("Placed", {"id": 3}, deployment_id="orders-20"))
        await harness.settle(second.rollback_id)
        assert {"cancel": 3} in [c.json() for c in harness.sent]
