"""The demo shop's services against the real (embedded) broker.

Every test uses its own topic prefix and consumer groups, so tests never see
each other's records on the session broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from examples.shop.flow import ORDERS_BAD, PAYMENTS_STABLE, Deployment
from examples.shop.schemas import (
    CancelOrder,
    Command,
    OrderLine,
    RefundPayment,
    ReleaseStock,
    ShopTopics,
)
from examples.shop.services import (
    InventoryService,
    OrdersService,
    PaymentsService,
    Shop,
    ShopService,
    confirmation_event_id,
    ensure_topics,
)
from schemas.envelope import EventEnvelope
from schemas.headers import (
    COMPENSATES_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    ROLLBACK_ID_HEADER,
    TRACEPARENT_HEADER,
    TRACESTATE_HEADER,
)
from tests.support.names import unique_name
from tests.support.waiting import wait_for

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# Group joins on Tansu take half the session timeout: keep it short in tests.
FAST_GROUPS: dict[str, Any] = {"session_timeout_ms": 2_000, "heartbeat_interval_ms": 500}
DEADLINE = 30.0


class Collector:
    """Reads topics from the beginning (no group) and keeps every record."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        self.records: list[ConsumerRecord[bytes, bytes]] = []
        self._consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _read(self) -> None:
        async for record in self._consumer:
            self.records.append(record)

    def envelopes(self, event_type: str | None = None) -> list[EventEnvelope]:
        found = [EventEnvelope.model_validate_json(r.value or b"") for r in self.records]
        return [e for e in found if event_type is None or e.event_type == event_type]

    def caused_by(self, key: str) -> list[ConsumerRecord[bytes, bytes]]:
        return [
            r
            for r in self.records
            if EventEnvelope.model_validate_json(r.value or b"").causation_id == key
        ]


@contextlib.asynccontextmanager
async def collecting(bootstrap: str, topics: Sequence[str]) -> AsyncIterator[Collector]:
    await ensure_topics(bootstrap, topics)
    collector = Collector(bootstrap, topics)
    await collector.start()
    try:
        yield collector
    finally:
        await collector.stop()


@contextlib.asynccontextmanager
async def running(service: ShopService) -> AsyncIterator[ShopService]:
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def command_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def send_command(
    producer: AIOKafkaProducer,
    topic: str,
    command: Command,
    *,
    key: str | None,
    extra_headers: Sequence[tuple[str, bytes]] = (),
) -> None:
    headers = [(TRACEPARENT_HEADER, TRACEPARENT), *extra_headers]
    if key is not None:
        headers += [
            (IDEMPOTENCY_KEY_HEADER, key.encode()),
            (ROLLBACK_ID_HEADER, b"rollback-1"),
            (COMPENSATES_HEADER, b"event-1"),
        ]
    await producer.send_and_wait(
        topic,
        value=command.model_dump_json().encode(),
        key=command.order_id.encode(),
        headers=headers,
    )


@pytest.fixture
def topics() -> ShopTopics:
    return ShopTopics(prefix=unique_name("shop") + ".")


def _service(cls: type[ShopService], bootstrap: str, topics: ShopTopics) -> ShopService:
    return cls(bootstrap, topics=topics, group_id=unique_name(cls.service), **FAST_GROUPS)


@contextlib.asynccontextmanager
async def payments_at_work(
    bootstrap: str, topics: ShopTopics
) -> AsyncIterator[tuple[PaymentsService, Collector, AIOKafkaProducer]]:
    """The payments service running, a collector of its events and a command producer."""
    payments = _service(PaymentsService, bootstrap, topics)
    assert isinstance(payments, PaymentsService)
    async with (
        collecting(bootstrap, [topics.payments_events]) as events,
        running(payments),
        command_producer(bootstrap) as producer,
    ):
        yield payments, events, producer


def _refund(order_id: str = "order-1", cents: int = 2_598) -> RefundPayment:
    return RefundPayment(
        order_id=order_id,
        correlation_id="checkout-1",
        payment_id="pay-1",
        amount_cents=cents,
        currency="EUR",
    )


async def test_command_is_applied_and_confirmed_with_the_key_as_causation(
    kafka_bootstrap: str, topics: ShopTopics
) -> None:
    key = str(uuid.uuid4())
    async with payments_at_work(kafka_bootstrap, topics) as (payments, events, producer):
        await send_command(
            producer,
            topics.payments_commands,
            _refund(),
            key=key,
            extra_headers=[(TRACESTATE_HEADER, b"vendor=1")],
        )
        [record] = await wait_for(
            lambda: events.caused_by(key), timeout=DEADLINE, message="PaymentRefunded"
        )

    confirmation = EventEnvelope.model_validate_json(record.value or b"")
    assert confirmation.event_type == "PaymentRefunded"
    assert confirmation.causation_id == key
    assert confirmation.event_id == confirmation_event_id("payments", key)
    assert confirmation.correlation_id == "checkout-1"
    assert confirmation.key == "order-1"
    assert record.key == b"order-1"
    assert (confirmation.deployment_id, confirmation.service_version) == (
        PAYMENTS_STABLE.deployment_id,
        PAYMENTS_STABLE.service_version,
    )
    assert confirmation.payload == {
        "order_id": "order-1",
        "payment_id": "pay-1",
        "amount_cents": 2_598,
        "currency": "EUR",
    }
    assert dict(record.headers)[TRACEPARENT_HEADER] == TRACEPARENT
    assert dict(record.headers)[TRACESTATE_HEADER] == b"vendor=1"
    assert payments.applied_keys == {key}
    assert payments.deliveries[key] == 1
    assert payments.payments["order-1"].refunded_cents == 2_598


async def test_the_same_command_twice_is_applied_once_and_confirmed_twice_identically(
    kafka_bootstrap: str, topics: ShopTopics
) -> None:
    key = str(uuid.uuid4())
    async with payments_at_work(kafka_bootstrap, topics) as (payments, events, producer):
        for _ in range(2):
            await send_command(producer, topics.payments_commands, _refund(cents=500), key=key)
        records = await wait_for(
            lambda: len(events.caused_by(key)) == 2 and events.caused_by(key),
            timeout=DEADLINE,
            message="two confirmations",
        )

    assert payments.deliveries[key] == 2
    assert payments.applications[key] == 1
    assert payments.applied_keys == {key}
    assert payments.payments["order-1"].refunded_cents == 500  # not 1000
    first, second = (EventEnvelope.model_validate_json(r.value or b"") for r in records)
    assert first == second  # same event id, same time: Backout tracks it once


async def test_a_command_without_idempotency_key_is_rejected_not_applied(
    kafka_bootstrap: str, topics: ShopTopics
) -> None:
    key = str(uuid.uuid4())
    async with payments_at_work(kafka_bootstrap, topics) as (payments, events, producer):
        # Same partition (same record key), so the keyed command is read after it.
        await send_command(producer, topics.payments_commands, _refund(cents=700), key=None)
        await send_command(producer, topics.payments_commands, _refund(cents=300), key=key)
        await wait_for(lambda: events.caused_by(key), timeout=DEADLINE, message="keyed command")

    assert payments.rejected == 1
    assert "backout-idempotency-key" in payments.rejections[0].reason
    assert payments.rejections[0].idempotency_key is None
    assert payments.applied_keys == {key}
    assert payments.payments["order-1"].refunded_cents == 300
    assert len(events.records) == 1


async def test_orders_and_inventory_apply_their_commands(
    kafka_bootstrap: str, topics: ShopTopics
) -> None:
    orders = _service(OrdersService, kafka_bootstrap, topics)
    inventory = _service(InventoryService, kafka_bootstrap, topics)
    assert isinstance(orders, OrdersService)
    assert isinstance(inventory, InventoryService)
    orders.orders["order-7"] = "placed"
    before = inventory.stock["sku-travel-mug"]
    cancel_key, release_key = str(uuid.uuid4()), str(uuid.uuid4())
    async with (
        collecting(kafka_bootstrap, [topics.orders_events, topics.inventory_events]) as events,
        running(orders),
        running(inventory),
        command_producer(kafka_bootstrap) as producer,
    ):
        await send_command(
            producer,
            topics.orders_commands,
            CancelOrder(order_id="order-7", correlation_id="checkout-7"),
            key=cancel_key,
        )
        release = ReleaseStock(
            order_id="order-7",
            correlation_id="checkout-7",
            lines=[OrderLine(sku="sku-travel-mug", quantity=2)],
        )
        await send_command(producer, topics.inventory_commands, release, key=release_key)
        await wait_for(
            lambda: events.caused_by(cancel_key) and events.caused_by(release_key),
            timeout=DEADLINE,
            message="both confirmations",
        )

    [cancelled] = events.envelopes("OrderCancelled")
    assert cancelled.causation_id == cancel_key
    assert cancelled.payload["previous_status"] == "placed"
    assert orders.orders["order-7"] == "cancelled"
    [released] = events.envelopes("StockReleased")
    assert released.causation_id == release_key
    assert released.correlation_id == "checkout-7"
    assert inventory.stock["sku-travel-mug"] == before + 2
    assert inventory.released == {"order-7"}


async def test_shop_forward_flow_emits_linked_envelopes(
    kafka_bootstrap: str, topics: ShopTopics
) -> None:
    shop = Shop(kafka_bootstrap, topics=topics, group_prefix=unique_name("shop"), **FAST_GROUPS)
    async with collecting(kafka_bootstrap, topics.all_events()) as events, shop:
        bad = await shop.place_order(deployment=ORDERS_BAD, legacy_v1=True, views=2)
        await wait_for(
            lambda: len(events.records) == len(bad.events),
            timeout=DEADLINE,
            message="every forward event",
        )

    by_id = {e.event_id: e for e in events.envelopes()}
    assert set(by_id) == {e.event_id for e in bad.events}
    placed = by_id[bad.one("OrderPlaced").event_id]
    assert (placed.schema_version, placed.deployment_id) == (1, ORDERS_BAD.deployment_id)
    assert placed.payload["amount_cents"] == bad.total_cents
    assert {e.correlation_id for e in by_id.values()} == {bad.checkout_id}
    for record in events.records:
        envelope = EventEnvelope.model_validate_json(record.value or b"")
        assert record.key == bad.order_id.encode()
        assert record.topic == topics.events(envelope.service)
        assert dict(record.headers)[TRACEPARENT_HEADER] == bad.traceparent(envelope).encode()
    assert by_id[bad.one("PaymentCaptured").event_id].causation_id == placed.event_id
    assert shop.orders.orders == {bad.order_id: "placed"}
    assert shop.payments.payments[bad.order_id].captured_cents == bad.total_cents
    assert shop.problems_after_rollback(ORDERS_BAD.deployment_id) != []


def test_a_service_runs_as_a_deployment() -> None:
    with pytest.raises(ValueError, match="cannot run as"):
        PaymentsService("127.0.0.1:1", deployment=Deployment("orders", "orders-9", "9"))


async def test_cli_serves_one_service_until_sigterm(
    kafka_bootstrap: str, topics: ShopTopics, tmp_path: Path
) -> None:
    state_file = tmp_path / "state.json"
    out_path = tmp_path / "stdout.txt"
    key = str(uuid.uuid4())
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "examples.shop.services",
            "inventory",
            "--broker",
            kafka_bootstrap,
            "--topic-prefix",
            topics.prefix,
            "--group-prefix",
            unique_name("cli"),
            "--deployment-id",
            "inventory-2.1-e5",
            "--service-version",
            "2.1",
            "--state-file",
            str(state_file),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    try:
        await wait_for(
            lambda: proc.returncode is not None or '"ready"' in out_path.read_text(),
            timeout=60,
            message="the service to print its ready line",
        )
        assert proc.returncode is None, out_path.read_text()
        async with (
            collecting(kafka_bootstrap, [topics.inventory_events]) as events,
            command_producer(kafka_bootstrap) as producer,
        ):
            release = ReleaseStock(
                order_id="order-9", lines=[OrderLine(sku="sku-paper-filters", quantity=4)]
            )
            await send_command(producer, topics.inventory_commands, release, key=key)
            [record] = await wait_for(
                lambda: events.caused_by(key), timeout=DEADLINE, message="StockReleased"
            )
        confirmation = EventEnvelope.model_validate_json(record.value or b"")
        assert confirmation.deployment_id == "inventory-2.1-e5"
        state = json.loads(state_file.read_text())
        assert state["applied_keys"] == [key]
        assert state["state"]["released"] == ["order-9"]

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=DEADLINE) == 0
        last = json.loads(out_path.read_text().strip().splitlines()[-1])
        assert last["event"] == "stopped"
        assert last["state"]["deliveries"] == {key: 1}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
