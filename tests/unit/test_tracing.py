"""The span tree of a rollback (issue: trace every compensation), with the in-memory exporter."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sagas import CompensationContext, RetryPolicy, Saga, tracing
from sagas.testing import SagaTestHarness

TRACEPARENTS = {
    "placed": "00-11111111111111111111111111111111-1111111111111111-01",
    "charged": "00-22222222222222222222222222222222-2222222222222222-01",
    "reserved": "00-33333333333333333333333333333333-3333333333333333-01",
}


def build_saga(failures_before_success: int = 0) -> tuple[Saga, dict[str, int]]:
    saga = Saga("traced")
    calls = {"refund": 0}

    @saga.compensate("Placed")
    async def cancel(event: dict[str, Any], ctx: CompensationContext) -> None:
        await ctx.send("orders.commands", {"cancel": event["id"]}, key=str(event["id"]))

    @saga.compensate("Charged", retry=RetryPolicy(max_attempts=3, initial_delay=1, jitter=0))
    async def refund(event: dict[str, Any], ctx: CompensationContext) -> None:
        calls["refund"] += 1
        if calls["refund"] <= failures_before_success:
            raise ConnectionError("payments unreachable")
        await ctx.send("payments.commands", {"refund": event["id"]}, key=str(event["id"]))

    @saga.compensate("Reserved")
    async def release(event: dict[str, Any], ctx: CompensationContext) -> None:
        await ctx.send("stock.commands", {"release": event["id"]}, key=str(event["id"]))

    return saga, calls


async def run_traced_rollback(harness: SagaTestHarness) -> tuple[str, dict[str, Any]]:
    placed = harness.envelope("Placed", {"id": "o1"}, deployment_id="orders-2", correlation_id="c1")
    charged = harness.envelope(
        "Charged",
        {"id": "o1"},
        deployment_id="pay-1",
        correlation_id="c1",
        causation_id=placed.event_id,
    )
    reserved = harness.envelope(
        "Reserved",
        {"id": "o1"},
        deployment_id="stock-1",
        correlation_id="c1",
        causation_id=placed.event_id,
    )
    from sagas.testing import tracked

    batch = [
        tracked(placed, traceparent=TRACEPARENTS["placed"]),
        tracked(charged, traceparent=TRACEPARENTS["charged"]),
        tracked(reserved, traceparent=TRACEPARENTS["reserved"]),
    ]
    await harness.ledger.track(batch, now=harness.clock.now())
    with trace.get_tracer("test").start_as_current_span("signal received") as signal_span:
        record = await harness.engine.handle_signal(harness.signal("orders-2"))
    await harness.settle(record.rollback_id)
    events = {"placed": placed, "charged": charged, "reserved": reserved}
    return record.rollback_id, {"signal": signal_span, "events": events}


def by_name(spans: InMemorySpanExporter, name: str) -> list[Any]:
    return [s for s in spans.get_finished_spans() if s.name == name]


async def test_span_tree_links_attributes_and_command_traceparents(
    spans: InMemorySpanExporter,
) -> None:
    saga, _ = build_saga()
    async with SagaTestHarness(saga) as harness:
        rollback_id, found = await run_traced_rollback(harness)
        sent = list(harness.sent)

    signal_context = found["signal"].get_span_context()
    [rollback] = by_name(spans, tracing.SPAN_ROLLBACK)
    [plan] = by_name(spans, tracing.SPAN_PLAN)
    assert rollback.parent.span_id == signal_context.span_id
    assert rollback.context.trace_id == signal_context.trace_id
    assert plan.parent.span_id == signal_context.span_id
    assert plan.attributes[tracing.PLANNED] == 3

    compensations = by_name(spans, tracing.SPAN_COMPENSATE)
    assert len(compensations) == 3
    by_type = {s.attributes[tracing.EVENT_TYPE]: s for s in compensations}
    for event_name, event_type in (
        ("placed", "Placed"),
        ("charged", "Charged"),
        ("reserved", "Reserved"),
    ):
        span = by_type[event_type]
        assert span.parent.span_id == rollback.context.span_id
        [link] = span.links
        assert f"{link.context.trace_id:032x}" == TRACEPARENTS[event_name].split("-")[1]
        assert f"{link.context.span_id:016x}" == TRACEPARENTS[event_name].split("-")[2]
        event = found["events"][event_name]
        assert span.attributes[tracing.ROLLBACK_ID] == rollback_id
        assert span.attributes[tracing.DEPLOYMENT_ID] == "orders-2"
        assert span.attributes[tracing.EVENT_ID] == event.event_id
        assert span.attributes[tracing.SAGA] == "traced"
        assert span.attributes[tracing.ATTEMPT] == 1
        assert span.attributes[tracing.OUTCOME] == "applied"
        assert span.attributes[tracing.IDEMPOTENCY_KEY]

    producers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert sorted(s.name for s in producers) == [
        "send orders.commands",
        "send payments.commands",
        "send stock.commands",
    ]
    compensate_ids = {s.context.span_id: s for s in compensations}
    for command in sent:
        [producer] = [s for s in producers if s.name == f"send {command.topic}"]
        assert producer.parent.span_id in compensate_ids
        assert producer.attributes["messaging.system"] == "kafka"
        assert producer.attributes["messaging.destination.name"] == command.topic
        version, trace_id, span_id, _flags = str(command.header("traceparent")).split("-")
        assert (version, trace_id, span_id) == (
            "00",
            f"{producer.context.trace_id:032x}",
            f"{producer.context.span_id:016x}",
        )


async def test_a_failed_then_retried_compensation_shows_two_attempts(
    spans: InMemorySpanExporter,
) -> None:
    saga, calls = build_saga(failures_before_success=1)
    async with SagaTestHarness(saga) as harness:
        await run_traced_rollback(harness)

    assert calls["refund"] == 2
    attempts = sorted(
        (
            s
            for s in by_name(spans, tracing.SPAN_COMPENSATE)
            if s.attributes[tracing.EVENT_TYPE] == "Charged"
        ),
        key=lambda s: s.attributes[tracing.ATTEMPT],
    )
    assert [s.attributes[tracing.ATTEMPT] for s in attempts] == [1, 2]
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert "payments unreachable" in (attempts[0].status.description or "")
    assert attempts[0].attributes[tracing.OUTCOME] == "pending"
    assert attempts[1].status.status_code != StatusCode.ERROR
    assert attempts[1].attributes[tracing.OUTCOME] == "applied"
    assert (
        attempts[0].attributes[tracing.IDEMPOTENCY_KEY]
        == (attempts[1].attributes[tracing.IDEMPOTENCY_KEY])
    )


async def test_a_confirmation_gets_a_span_linked_to_its_compensation(
    spans: InMemorySpanExporter,
) -> None:
    saga = Saga("confirmed")

    @saga.compensate("Placed", confirm="Cancelled")
    async def cancel(event: dict[str, Any], ctx: CompensationContext) -> None:
        await ctx.send("orders.commands", {"cancel": event["id"]})

    async with SagaTestHarness(saga) as harness:
        placed = harness.envelope("Placed", {"id": "o1"}, deployment_id="orders-2")
        await harness.emit(placed)
        record = await harness.rollback("orders-2", settle=False)
        from tests.support.waiting import wait_for

        await wait_for(lambda: harness.sent, timeout=5, message="command not sent")
        [compensate] = by_name(spans, tracing.SPAN_COMPENSATE)
        confirmation = harness.envelope(
            "Cancelled",
            {},
            deployment_id="orders-1",
            causation_id=harness.sent[0].header("backout-idempotency-key"),
        )
        from sagas.testing import tracked

        confirming_parent = "00-44444444444444444444444444444444-4444444444444444-01"
        result = await harness.ledger.track(
            [tracked(confirmation, traceparent=confirming_parent)], now=harness.clock.now()
        )
        await harness.engine.on_tracked(result)
        final = await harness.settle(record.rollback_id)

    assert final.state == "completed"
    [confirm] = by_name(spans, tracing.SPAN_CONFIRM)
    assert f"{confirm.parent.span_id:016x}" == "4444444444444444"
    [link] = confirm.links
    assert link.context.span_id == compensate.context.span_id
    assert confirm.attributes[tracing.EVENT_ID] == confirmation.event_id
