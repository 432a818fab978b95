"""The demo shop's checkout saga, with `sagas.testing.SagaTestHarness` (no Kafka).

The last tests wire the harness to the shop's real service classes (their
Kafka producer replaced by a list), so the saga's commands are checked
against what the services actually parse and confirm.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from examples.shop.flow import (
    INVENTORY_STABLE,
    ORDERS_BAD,
    ORDERS_STABLE,
    PAYMENTS_STABLE,
    Checkout,
    build_checkout,
    make_envelope,
)
from examples.shop.saga import (
    RECEIPT_ACTION,
    build_checkout_saga,
    checkout,
    order_placed_v1_to_v2,
)
from examples.shop.schemas import (
    OrderLine,
    OrderPlaced,
    OrderPlacedV1,
    PaymentRefunded,
    ShopTopics,
)
from examples.shop.services import Shop, ShopService, confirmation_event_id
from sagas.context import SentCommand
from sagas.engine import EngineSettings
from sagas.ledger.records import CompensationState
from sagas.registry import Compensate, Ignored, Manual, SagaRegistry
from sagas.testing import SagaTestHarness
from schemas import utc_now
from schemas.envelope import EventEnvelope
from schemas.headers import (
    COMPENSATES_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    ROLLBACK_ID_HEADER,
    TRACEPARENT_HEADER,
)
from schemas.status import RollbackState
from tests.support.waiting import wait_for

BAD = ORDERS_BAD.deployment_id

CONFIRMATION_OF = {
    "orders.commands": "OrderCancelled",
    "payments.commands": "PaymentRefunded",
    "inventory.commands": "StockReleased",
}


def _checkout(harness: SagaTestHarness, **options: Any) -> Checkout:
    """A checkout whose events fall inside the harness's fake time."""
    return build_checkout(start=harness.clock.now() + timedelta(seconds=1), **options)


def _commands_for(sent: list[SentCommand], order_id: str) -> list[SentCommand]:
    return [c for c in sent if c.json()["order_id"] == order_id]


# --------------------------------------------------------------------- definition


def test_checkout_saga_declares_every_shop_event_type() -> None:
    registry = SagaRegistry([checkout])
    placed_v2 = registry.resolve("OrderPlaced", 2)
    placed_v1 = registry.resolve("OrderPlaced", 1)
    assert isinstance(placed_v2, Compensate)
    assert placed_v2.step.model is OrderPlaced
    assert placed_v2.step.confirm == "OrderCancelled"
    assert isinstance(placed_v1, Compensate)  # through the upcaster
    assert placed_v1.step.version == 2
    refund = registry.resolve("PaymentCaptured", 1)
    assert isinstance(refund, Compensate)
    assert refund.step.confirm == "PaymentRefunded"
    assert refund.step.retry.max_attempts == 8
    release = registry.resolve("StockReserved", 1)
    assert isinstance(release, Compensate)
    assert release.step.confirm == "StockReleased"
    receipt = registry.resolve("ReceiptEmailed", 1)
    assert isinstance(receipt, Manual)
    assert receipt.action.action == RECEIPT_ACTION
    assert isinstance(registry.resolve("OrderViewed", 1), Ignored)
    # Confirmations are a service's reaction to a compensation, never undone themselves.
    assert {"OrderCancelled", "PaymentRefunded", "StockReleased"}.isdisjoint(checkout.claims())


def test_upcaster_turns_a_v1_order_into_a_valid_v2_order() -> None:
    v1 = OrderPlacedV1(order_id="o-1", sku="sku-travel-mug", quantity=3, amount_cents=4500)
    v2 = OrderPlaced.model_validate(order_placed_v1_to_v2(v1.model_dump()))
    assert v2 == OrderPlaced(
        order_id="o-1",
        customer_id="unknown",
        lines=[OrderLine(sku="sku-travel-mug", quantity=3)],
        total_cents=4500,
        currency="EUR",
    )


def test_payload_models_carry_their_type_and_version() -> None:
    assert (OrderPlacedV1.__event_type__, OrderPlacedV1.__schema_version__) == ("OrderPlaced", 1)
    assert (OrderPlaced.__event_type__, OrderPlaced.__schema_version__) == ("OrderPlaced", 2)
    assert "__schema_version__" not in OrderPlaced.model_fields


def test_checkout_flow_links_every_event_to_one_instance() -> None:
    flow = build_checkout(orders=ORDERS_BAD, views=2)
    placed = flow.one("OrderPlaced")
    captured = flow.one("PaymentCaptured")
    assert [e.event_type for e in flow.events] == [
        "OrderPlaced",
        "PaymentCaptured",
        "StockReserved",
        "ReceiptEmailed",
        "OrderViewed",
        "OrderViewed",
    ]
    assert {e.correlation_id for e in flow.events} == {flow.checkout_id}
    assert {e.record_key for e in flow.events} == {flow.order_id}
    assert captured.causation_id == placed.event_id
    assert flow.one("StockReserved").causation_id == placed.event_id
    assert flow.one("ReceiptEmailed").causation_id == captured.event_id
    assert [e.occurred_at for e in flow.events] == sorted({e.occurred_at for e in flow.events})
    assert placed.deployment_id == BAD
    assert captured.deployment_id == PAYMENTS_STABLE.deployment_id
    assert flow.one("StockReserved").deployment_id == INVENTORY_STABLE.deployment_id
    assert flow.one("ReceiptEmailed").deployment_id == BAD
    assert flow.traceparent(placed).startswith(f"00-{flow.trace_id}-")


def test_v1_checkout_has_one_line_only() -> None:
    lines = [
        OrderLine(sku="sku-travel-mug", quantity=1),
        OrderLine(sku="sku-burr-grinder", quantity=1),
    ]
    with pytest.raises(ValueError, match="exactly one line"):
        build_checkout(legacy_v1=True, lines=lines)
    with pytest.raises(ValueError, match="unknown SKUs"):
        build_checkout(lines=[OrderLine(sku="sku-unicorn", quantity=1)])


def test_topics_are_prefixable_and_the_saga_follows_them() -> None:
    topics = ShopTopics(prefix="t1.")
    assert topics.orders_commands == "t1.orders.commands"
    assert topics.all_events() == ["t1.orders.events", "t1.payments.events", "t1.inventory.events"]
    assert ShopTopics().payments_commands == "payments.commands"
    with pytest.raises(ValueError, match="unknown shop service"):
        topics.events("shipping")
    assert build_checkout_saga(topics).name == "checkout"


# ------------------------------------------------------------------------ rollback


async def _confirm_each(harness: SagaTestHarness, count: int, **payload: Any) -> None:
    """Answer commands as the services would, one by one: within a saga instance
    each step waits for the confirmation of the step undone before it."""
    for index in range(count):
        await wait_for(lambda n=index: len(harness.sent) > n, message=f"command {index + 1} sent")
        command = harness.sent[index]
        await harness.confirm(command, CONFIRMATION_OF[command.topic], **payload)


async def test_rollback_of_bad_orders_deployment_undoes_children_before_the_order() -> None:
    async with SagaTestHarness(checkout) as harness:
        good = _checkout(harness, orders=ORDERS_STABLE)
        bad = _checkout(harness, orders=ORDERS_BAD, views=2)
        await harness.emit(*good.events, *bad.events)

        record = await harness.rollback(BAD, settle=False)
        await _confirm_each(harness, 3, order_id=bad.order_id)

        sent = harness.sent
        assert _commands_for(sent, good.order_id) == []
        by_topic = {c.topic: c for c in sent}
        assert set(by_topic) == {"orders.commands", "payments.commands", "inventory.commands"}
        # Children (payment, stock) are undone before the order they were caused
        # by, and within the instance the latest step first.
        assert [c.topic for c in sent] == [
            "inventory.commands",
            "payments.commands",
            "orders.commands",
        ]

        cancel = by_topic["orders.commands"].json()
        assert cancel["command"] == "CancelOrder"
        assert cancel["order_id"] == bad.order_id
        assert cancel["correlation_id"] == bad.checkout_id
        refund = by_topic["payments.commands"].json()
        assert refund["command"] == "RefundPayment"
        assert refund["amount_cents"] == bad.total_cents
        assert refund["currency"] == "EUR"
        release = by_topic["inventory.commands"].json()
        assert release["command"] == "ReleaseStock"
        assert release["lines"] == [line.model_dump() for line in bad.lines]

        compensated = {
            "orders.commands": bad.one("OrderPlaced"),
            "payments.commands": bad.one("PaymentCaptured"),
            "inventory.commands": bad.one("StockReserved"),
        }
        keys = set()
        for topic, command in by_topic.items():
            assert command.key == bad.order_id.encode()
            assert command.header(ROLLBACK_ID_HEADER) == record.rollback_id
            assert command.header(COMPENSATES_HEADER) == compensated[topic].event_id
            keys.add(command.header(IDEMPOTENCY_KEY_HEADER))
        assert None not in keys
        assert len(keys) == 3

        done = await harness.settle(record.rollback_id)

        assert done.state == RollbackState.COMPLETED_WITH_WARNINGS
        items = await harness.compensations(record.rollback_id)
        assert {i.state for i in items} == {CompensationState.CONFIRMED}
        assert {i.event_type for i in items} == {"OrderPlaced", "PaymentCaptured", "StockReserved"}
        status = await harness.engine.status_of(record.rollback_id)
        assert (status.planned, status.confirmed, status.failed) == (3, 3, 0)
        assert (status.manual, status.uncovered) == (1, 0)
        # ReceiptEmailed is a manual action with its instruction; OrderViewed is ignored.
        assert [(m["event_type"], m["detail"]) for m in done.manual] == [
            ("ReceiptEmailed", RECEIPT_ACTION)
        ]
        assert done.uncovered == []
        assert len(harness.sent) == 3  # nothing re-sent once confirmed


async def test_v1_order_placed_is_upcast_and_cancelled() -> None:
    async with SagaTestHarness(checkout) as harness:
        legacy = _checkout(
            harness,
            orders=ORDERS_BAD,
            legacy_v1=True,
            lines=[OrderLine(sku="sku-burr-grinder", quantity=1)],
        )
        assert legacy.one("OrderPlaced").schema_version == 1
        await harness.emit(*legacy.events)

        record = await harness.rollback(BAD, settle=False)
        await _confirm_each(harness, 3)
        done = await harness.settle(record.rollback_id)

        assert done.state == RollbackState.COMPLETED_WITH_WARNINGS
        placed = next(
            i
            for i in await harness.compensations(record.rollback_id)
            if i.event_type == "OrderPlaced"
        )
        assert placed.target_version == 2
        assert placed.state == CompensationState.CONFIRMED
        cancel = next(c for c in harness.sent if c.topic == "orders.commands").json()
        assert cancel == {
            "command": "CancelOrder",
            "order_id": legacy.order_id,
            "correlation_id": legacy.checkout_id,
            "reason": f"rollback {record.rollback_id} of {BAD}",
        }


async def test_unconfirmed_refund_is_resent_with_the_same_key_until_attempts_run_out() -> None:
    # Long fake poll intervals: settle() then jumps straight from timeout to timeout.
    slow_polls = EngineSettings(poll_interval=30.0, progress_interval=30.0)
    async with SagaTestHarness(checkout, settings=slow_polls) as harness:
        bad = _checkout(harness, orders=ORDERS_BAD)
        await harness.emit(*bad.events)

        record = await harness.rollback(BAD, settle=False)
        await _confirm_each(harness, 1)  # the stock release, undone first
        done = await harness.settle(record.rollback_id)

        refunds = [c for c in harness.sent if c.topic == "payments.commands"]
        assert len(refunds) == 8  # RetryPolicy(max_attempts=8)
        assert len({c.header(IDEMPOTENCY_KEY_HEADER) for c in refunds}) == 1
        assert done.state == RollbackState.FAILED
        states = {i.event_type: i.state for i in await harness.compensations(record.rollback_id)}
        assert states["PaymentCaptured"] == CompensationState.FAILED
        assert states["StockReserved"] == CompensationState.CONFIRMED
        # The order is not cancelled while its refund is unconfirmed (DESIGN §4).
        assert states["OrderPlaced"] == CompensationState.BLOCKED
        assert not [c for c in harness.sent if c.topic == "orders.commands"]


async def test_confirmation_from_a_service_deployment_completes_the_step() -> None:
    """A confirmation as a service emits it (its own deployment, causation = key)."""
    async with SagaTestHarness(checkout) as harness:
        bad = _checkout(harness, orders=ORDERS_BAD)
        await harness.emit(*bad.events)
        record = await harness.rollback(BAD, settle=False)
        await _confirm_each(harness, 1)  # the stock release, undone first
        await wait_for(lambda: len(harness.sent) >= 2, message="refund sent")

        refund = next(c for c in harness.sent if c.topic == "payments.commands")
        key = refund.header(IDEMPOTENCY_KEY_HEADER)
        confirmation = make_envelope(
            PaymentRefunded(order_id=bad.order_id, amount_cents=bad.total_cents, currency="EUR"),
            deployment=PAYMENTS_STABLE,
            correlation_id=bad.checkout_id,
            key=bad.order_id,
            causation_id=key,
            event_id=confirmation_event_id("payments", str(key)),
            occurred_at=harness.clock.now(),
        )
        result = await harness.emit(confirmation)
        assert result.confirmed_keys == [key]
        again = await harness.emit(confirmation)  # a re-emitted confirmation is a duplicate
        assert (again.duplicates, again.confirmed_keys) == (1, [])
        await wait_for(lambda: len(harness.sent) == 3, message="CancelOrder sent")
        await harness.confirm(harness.sent[-1], "OrderCancelled")
        done = await harness.settle(record.rollback_id)
        assert done.state == RollbackState.COMPLETED_WITH_WARNINGS


# ------------------------------------------------- the saga against the real services


class _Outbox:
    """Stands in for the services' Kafka producers: keeps what they publish."""

    def __init__(self) -> None:
        self.published: list[tuple[str, EventEnvelope, list[tuple[str, bytes]]]] = []

    def attach(self, service: ShopService) -> None:
        async def publish(
            envelope: EventEnvelope, *, headers: list[tuple[str, bytes]] | None = None
        ) -> None:
            self.published.append((service.service, envelope, list(headers or [])))

        service.publish = publish  # type: ignore[method-assign]

    def envelopes(self, service: str | None = None) -> list[EventEnvelope]:
        return [e for s, e, _ in self.published if service is None or s == service]


def _record(command: SentCommand, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=command.topic,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=command.key,
        value=command.value,
        checksum=None,
        serialized_key_size=len(command.key or b""),
        serialized_value_size=len(command.value),
        headers=[
            *command.headers,
            (TRACEPARENT_HEADER, b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
        ],
    )


async def test_shop_services_apply_the_sagas_commands_once_and_end_consistent() -> None:
    shop = Shop("127.0.0.1:1")  # never started: publishing goes to the outbox
    outbox = _Outbox()
    for service in shop.services.values():
        outbox.attach(service)
    await shop.place_demo_orders(3, deployment=ORDERS_STABLE)
    await shop.place_demo_orders(4, deployment=ORDERS_BAD, legacy_every=2)
    forward = outbox.envelopes()
    assert {e.schema_version for e in forward if e.event_type == "OrderPlaced"} == {1, 2}
    assert shop.problems_after_rollback(BAD) != []  # nothing undone yet

    async with SagaTestHarness(checkout) as harness:
        await harness.emit(*forward)
        record = await harness.rollback(
            BAD, settle=False, issued_at=utc_now() + timedelta(minutes=1)
        )
        offset = 0
        confirmed: set[str] = set()
        # Deliver every command twice (as after a redelivery), feed confirmations back.
        while len(confirmed) < 12:
            await wait_for(
                lambda: len(harness.sent) > len(confirmed), message="the next command", timeout=20
            )
            for command in harness.sent[len(confirmed) :]:
                service = shop.services[command.topic.split(".")[0]]
                for _ in range(2):
                    before = len(outbox.published)
                    await service.handle(_record(command, offset))
                    offset += 1
                    assert len(outbox.published) == before + 1
                    service_name, confirmation, headers = outbox.published[-1]
                    assert service_name == service.service
                    assert confirmation.causation_id == command.header(IDEMPOTENCY_KEY_HEADER)
                    assert dict(headers)[TRACEPARENT_HEADER].startswith(b"00-aaaa")
                    await harness.emit(confirmation)
                confirmed.add(str(command.header(IDEMPOTENCY_KEY_HEADER)))
        done = await harness.settle(record.rollback_id)

    assert done.state == RollbackState.COMPLETED_WITH_WARNINGS
    assert len(harness.sent) == 12  # 4 orders x (cancel, refund, release)
    assert shop.problems_after_rollback(BAD) == []
    for checkout_ in shop.checkouts_of(BAD):
        assert shop.is_undone(checkout_)
    for service in shop.services.values():
        assert all(count == 1 for count in service.applications.values())
        assert all(count == 2 for count in service.deliveries.values())
        assert len(service.applied_keys) == 4
        assert service.rejected == 0
    confirmations = [e for e in outbox.envelopes() if e.causation_id in confirmed]
    assert len(confirmations) == 24
    assert len({e.event_id for e in confirmations}) == 12  # a re-emit repeats the event id


async def test_service_rejects_a_command_without_idempotency_key() -> None:
    shop = Shop("127.0.0.1:1")
    outbox = _Outbox()
    outbox.attach(shop.payments)
    unkeyed = SentCommand(
        topic="payments.commands",
        value=b'{"command":"RefundPayment","order_id":"o-1","amount_cents":100,"currency":"EUR"}',
        key=b"o-1",
        headers=[],
    )
    wrong_service = SentCommand(
        topic="payments.commands",
        value=b'{"command":"CancelOrder","order_id":"o-1"}',
        key=b"o-1",
        headers=[(IDEMPOTENCY_KEY_HEADER, b"k-1")],
    )
    garbage = SentCommand(
        "payments.commands", b"not json", b"o-1", [(IDEMPOTENCY_KEY_HEADER, b"k-2")]
    )
    for offset, command in enumerate([unkeyed, wrong_service, garbage]):
        await shop.payments.handle(_record(command, offset))
    assert shop.payments.payments == {}
    assert shop.payments.applied_keys == set()
    assert outbox.published == []
    assert shop.payments.rejected == 3
    assert "backout-idempotency-key" in shop.payments.rejections[0].reason
    assert "does not handle CancelOrder" in shop.payments.rejections[1].reason
