"""The demo shop's services: orders, payments, inventory — plain aiokafka.

Each service consumes its command topic (`<service>.commands`) and produces
to its event topic (`<service>.events`), keeps its own in-memory state, and
applies a compensation command **at most once per `backout-idempotency-key`**:

- a command without the header is rejected (logged, counted in `rejections`),
  never applied;
- the first delivery of a key applies the command and emits a confirmation
  event (`OrderCancelled`, `PaymentRefunded`, `StockReleased`) whose
  `causation_id` is the key and whose `event_id` is derived from the key;
- a later delivery of the same key applies nothing and re-emits the *same*
  confirmation (same `event_id`; Backout tracks it once), so a confirmation
  lost in transit is recovered by Backout's retry.

The command's `traceparent`/`tracestate` headers are copied onto the
confirmation record. Offsets are committed by hand after a record is handled
(at-least-once delivery; the key check makes it at-most-once application).

`Shop` bundles the three services and drives the forward business flow
(placing orders as a given orders deployment). Run one service, or the whole
shop, from the command line::

    python -m examples.shop.services payments --broker 127.0.0.1:9092
    python -m examples.shop.services all --broker 127.0.0.1:9092 --place-orders 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import TypeAdapter, ValidationError

from examples.shop.flow import (
    CATALOG,
    DEFAULT_DEPLOYMENTS,
    INITIAL_STOCK,
    ORDERS_BAD,
    ORDERS_STABLE,
    Checkout,
    Deployment,
    build_checkout,
    make_envelope,
)
from examples.shop.schemas import (
    SERVICES,
    TOPIC_PREFIX_ENV,
    AnyCommand,
    CancelOrder,
    Command,
    OrderCancelled,
    OrderLine,
    Payload,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ShopTopics,
    StockReleased,
)
from schemas.envelope import EventEnvelope
from schemas.headers import IDEMPOTENCY_KEY_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER

log = logging.getLogger("examples.shop")

CONFIRMATION_NAMESPACE = uuid.UUID("2a7d0c4e-91b3-5f6a-8e2d-5d0c0ffee0aa")
"""uuid5 namespace of confirmation event ids (fixed: ids must be stable across restarts)."""

_COMMANDS: TypeAdapter[CancelOrder | RefundPayment | ReleaseStock] = TypeAdapter(AnyCommand)
Headers = list[tuple[str, bytes]]


def confirmation_event_id(service: str, idempotency_key: str) -> str:
    """The `event_id` of the confirmation `service` emits for `idempotency_key`."""
    return str(uuid.uuid5(CONFIRMATION_NAMESPACE, f"{service}\x1f{idempotency_key}"))


def header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    """The first header called `name`, decoded (invalid UTF-8 replaced), or None."""
    for header_name, value in headers or ():
        if header_name == name:
            return value.decode(errors="replace") if value is not None else None
    return None


async def ensure_topics(bootstrap: str, topics: Sequence[str], *, partitions: int = 4) -> None:
    """Create the topics that do not exist yet (replication factor 1).

    Subscribing to a missing topic would leave a consumer without partitions
    until its next metadata refresh; creating them first avoids that wait.
    Failures are logged, not raised: producing auto-creates topics anyway.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        missing = sorted(set(topics) - set(await admin.list_topics()))
        if missing:
            await admin.create_topics(
                [
                    NewTopic(name, num_partitions=partitions, replication_factor=1)
                    for name in missing
                ]
            )
    except Exception as exc:  # best effort: the topics may be created by a producer instead
        log.warning("could not create topics %s: %s", list(topics), exc)
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class Rejection:
    """A command record that was not applied, and why."""

    reason: str
    topic: str
    partition: int
    offset: int
    idempotency_key: str | None = None


class _Lifecycle(ABC):
    """Something started and stopped: `async with` stops it on the way out, error or not."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and begin work."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop work and disconnect (idempotent)."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


class ShopService(_Lifecycle):
    """Base of the shop's services: one command consumer, one event producer.

    Args:
        bootstrap: Kafka bootstrap servers, `host:port[,host:port]`.
        deployment: what confirmations are stamped with; the service's
            default deployment (e.g. `payments-3.2-c3`) if omitted.
        topics: the shop's topic names (real names by default).
        group_id: consumer group of the command consumer (`shop-<service>`
            by default; with Tansu, use a fresh one per test run).
        session_timeout_ms, heartbeat_interval_ms: consumer group timing; a
            group join on Tansu takes half the session timeout.
        on_change: called after every state change (applied command, forward
            flow); the CLI uses it to write a state file.

    Attributes:
        applied_keys: idempotency keys whose command was applied.
        applications: times a command was applied per key (never above 1).
        deliveries: raw deliveries per key, duplicates and invalid commands included.
        rejections: commands not applied (no key, invalid, unknown), in order.
        confirmations: the confirmation envelope emitted per key.
        correlations: order id → correlation (checkout) id, from the forward flow.
    """

    service: ClassVar[str]
    """The service's name: `orders`, `payments` or `inventory`."""
    handles: ClassVar[tuple[type[Command], ...]]
    """The command types this service applies."""

    def __init__(
        self,
        bootstrap: str,
        *,
        deployment: Deployment | None = None,
        topics: ShopTopics | None = None,
        group_id: str | None = None,
        session_timeout_ms: int = 6_000,
        heartbeat_interval_ms: int = 1_000,
        on_change: Callable[[ShopService], None] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.deployment = deployment or DEFAULT_DEPLOYMENTS[self.service]
        if self.deployment.service != self.service:
            raise ValueError(
                f"{self.service} cannot run as {self.deployment.deployment_id} "
                f"(a {self.deployment.service} deployment)"
            )
        self.topics = topics or ShopTopics()
        self.group_id = group_id or f"shop-{self.service}"
        self.on_change = on_change
        self.applied_keys: set[str] = set()
        self.applications: Counter[str] = Counter()
        self.deliveries: Counter[str] = Counter()
        self.rejections: list[Rejection] = []
        self.confirmations: dict[str, EventEnvelope] = {}
        self.correlations: dict[str, str] = {}
        self._session_timeout_ms = session_timeout_ms
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    # -- topics -----------------------------------------------------------------

    @property
    def commands_topic(self) -> str:
        """The topic this service consumes commands from."""
        return self.topics.commands(self.service)

    @property
    def events_topic(self) -> str:
        """The topic this service emits its events (and confirmations) to."""
        return self.topics.events(self.service)

    # -- lifecycle --------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between `start()` and `stop()` while the consumer loop is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Create the topics if needed, start the producer and the command consumer."""
        if self._task is not None:
            return
        await ensure_topics(self.bootstrap, [self.commands_topic, self.events_topic])
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"shop-{self.service}",
            acks="all",
            enable_idempotence=False,  # Tansu has no idempotent producer
            linger_ms=5,
        )
        await producer.start()
        consumer = AIOKafkaConsumer(
            self.commands_topic,
            bootstrap_servers=self.bootstrap,
            client_id=f"shop-{self.service}",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
        )
        try:
            await consumer.start()
        except BaseException:
            # A failed or cancelled start still owns sockets: close both.
            await consumer.stop()
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._task = asyncio.create_task(self._consume(), name=f"shop {self.service} commands")
        log.info(
            "%s started as %s: %s -> %s (group %s)",
            self.service,
            self.deployment.deployment_id,
            self.commands_topic,
            self.events_topic,
            self.group_id,
        )

    async def stop(self) -> None:
        """Stop consuming, then close the consumer and the producer (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()

    # -- producing --------------------------------------------------------------

    async def publish(self, envelope: EventEnvelope, *, headers: Headers | None = None) -> None:
        """Send an envelope to this service's event topic; return once the broker has it.

        The record key is the envelope's `key`, else its `correlation_id`.
        """
        if self._producer is None:
            raise RuntimeError(f"{self.service} is not started")
        record_key = envelope.record_key
        await self._producer.send_and_wait(
            self.events_topic,
            value=envelope.model_dump_json().encode(),
            key=record_key.encode() if record_key is not None else None,
            headers=list(headers or []),
        )

    async def emit(
        self,
        payload: Payload,
        *,
        correlation_id: str | None,
        key: str | None,
        causation_id: str | None = None,
        deployment: Deployment | None = None,
        headers: Headers | None = None,
    ) -> EventEnvelope:
        """Wrap `payload` in an envelope (as `deployment`, default: this service) and publish it."""
        envelope = make_envelope(
            payload,
            deployment=deployment or self.deployment,
            correlation_id=correlation_id,
            key=key,
            causation_id=causation_id,
        )
        await self.publish(envelope, headers=headers)
        return envelope

    # -- consuming --------------------------------------------------------------

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving: the broker may come back
                log.warning("%s: fetching commands failed: %s", self.service, exc)
                await asyncio.sleep(0.5)
                continue
            for partition, records in batches.items():
                await self._process(consumer, partition, records)

    async def _process(
        self,
        consumer: AIOKafkaConsumer,
        partition: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
    ) -> None:
        next_offset: int | None = None
        for record in records:
            try:
                await self.handle(record)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The confirmation could not be produced: read the record again
                # (the key check keeps it from being applied twice).
                log.exception(
                    "%s: handling %s[%d]@%d failed; will retry",
                    self.service,
                    record.topic,
                    record.partition,
                    record.offset,
                )
                consumer.seek(partition, record.offset)
                break
            next_offset = record.offset + 1
        if next_offset is None:
            return
        try:
            await consumer.commit({partition: next_offset})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. a rebalance took the partition: redelivery is harmless
            log.warning("%s: commit of %s@%d failed: %s", self.service, partition, next_offset, exc)

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Handle one command record (what the consumer loop calls for each record).

        Rejects it without a `backout-idempotency-key` header or when invalid;
        applies it on the key's first delivery; publishes the key's
        confirmation (again, unchanged, on every later delivery).

        Raises:
            Exception: publishing the confirmation failed; the record must be
                handled again (the consumer loop seeks back to it).
        """
        key = header(record.headers, IDEMPOTENCY_KEY_HEADER)
        if not key:
            self._reject(record, f"no {IDEMPOTENCY_KEY_HEADER} header: command not applied")
            return
        self.deliveries[key] += 1
        confirmation = self.confirmations.get(key)
        if confirmation is None:
            try:
                command = self._parse(record.value)
                payload = self.apply(command)
            except (ValidationError, ValueError) as exc:
                self._reject(record, f"invalid command: {exc}", key)
                return
            confirmation = make_envelope(
                payload,
                deployment=self.deployment,
                correlation_id=command.correlation_id or self.correlations.get(command.order_id),
                key=command.order_id,
                causation_id=key,
                event_id=confirmation_event_id(self.service, key),
            )
            self.applied_keys.add(key)
            self.applications[key] += 1
            self.confirmations[key] = confirmation
            log.info("%s applied %s (key %s)", self.service, type(command).__name__, key)
            self._changed()
        else:
            log.info(
                "%s: key %s already applied (delivery %d): re-emitting its confirmation",
                self.service,
                key,
                self.deliveries[key],
            )
        trace = [
            (name, value)
            for name, value in record.headers or ()
            if name in (TRACEPARENT_HEADER, TRACESTATE_HEADER)
        ]
        await self.publish(confirmation, headers=trace)

    def _parse(self, value: bytes | None) -> Command:
        if value is None:
            raise ValueError("empty record value")
        command = _COMMANDS.validate_json(value)
        if not isinstance(command, self.handles):
            raise ValueError(f"{self.service} does not handle {type(command).__name__}")
        return command

    def _reject(
        self, record: ConsumerRecord[bytes, bytes], reason: str, key: str | None = None
    ) -> None:
        log.warning(
            "%s rejected %s[%d]@%d: %s",
            self.service,
            record.topic,
            record.partition,
            record.offset,
            reason,
        )
        self.rejections.append(
            Rejection(reason, record.topic, record.partition, record.offset, key)
        )
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.exception("%s: on_change callback failed", self.service)

    # -- state ------------------------------------------------------------------

    @abstractmethod
    def apply(self, command: Command) -> Payload:
        """Apply a command to the state; return the confirmation payload.

        Called at most once per idempotency key. Raises `ValueError` for a
        command that cannot be applied (it is then rejected, not confirmed).
        """

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """The service's business state, JSON-ready."""

    @property
    def rejected(self) -> int:
        """How many command records were rejected."""
        return len(self.rejections)

    def snapshot(self) -> dict[str, Any]:
        """Business state plus idempotency bookkeeping, JSON-ready."""
        return {
            "service": self.service,
            "deployment_id": self.deployment.deployment_id,
            "state": self.state(),
            "applied_keys": sorted(self.applied_keys),
            "deliveries": dict(self.deliveries),
            "rejected": self.rejected,
        }


class OrdersService(ShopService):
    """Orders: `{order_id: status}`; applies `CancelOrder`, confirms `OrderCancelled`."""

    service: ClassVar[str] = "orders"
    handles: ClassVar[tuple[type[Command], ...]] = (CancelOrder,)

    def __init__(self, bootstrap: str, **options: Any) -> None:
        super().__init__(bootstrap, **options)
        self.orders: dict[str, str] = {}

    def record_placed(self, checkout: Checkout) -> None:
        """Forward flow: the order of `checkout` is placed."""
        self.orders[checkout.order_id] = "placed"
        self.correlations[checkout.order_id] = checkout.checkout_id
        self._changed()

    def apply(self, command: Command) -> Payload:
        """Cancel the order (an unknown order is recorded as cancelled too)."""
        previous = self.orders.get(command.order_id)
        self.orders[command.order_id] = "cancelled"
        return OrderCancelled(
            order_id=command.order_id, previous_status=previous, reason=command.reason
        )

    def state(self) -> dict[str, Any]:
        """`{"orders": {order_id: status}}`."""
        return {"orders": dict(self.orders)}


@dataclass(slots=True)
class PaymentAccount:
    """What payments knows about one order's money."""

    payment_id: str | None
    currency: str
    captured_cents: int = 0
    refunded_cents: int = 0


class PaymentsService(ShopService):
    """Payments: captured/refunded cents per order; applies `RefundPayment`."""

    service: ClassVar[str] = "payments"
    handles: ClassVar[tuple[type[Command], ...]] = (RefundPayment,)

    def __init__(self, bootstrap: str, **options: Any) -> None:
        super().__init__(bootstrap, **options)
        self.payments: dict[str, PaymentAccount] = {}

    def record_captured(self, checkout: Checkout, payment_id: str) -> None:
        """Forward flow: the order's total was captured."""
        self.payments[checkout.order_id] = PaymentAccount(
            payment_id=payment_id, currency=checkout.currency, captured_cents=checkout.total_cents
        )
        self.correlations[checkout.order_id] = checkout.checkout_id
        self._changed()

    def apply(self, command: Command) -> Payload:
        """Refund the command's amount (applying it twice would refund twice)."""
        assert isinstance(command, RefundPayment)
        account = self.payments.setdefault(
            command.order_id,
            PaymentAccount(payment_id=command.payment_id, currency=command.currency),
        )
        account.refunded_cents += command.amount_cents
        return PaymentRefunded(
            order_id=command.order_id,
            payment_id=command.payment_id,
            amount_cents=command.amount_cents,
            currency=command.currency,
        )

    def state(self) -> dict[str, Any]:
        """`{"payments": {order_id: {captured_cents, refunded_cents, ...}}}`."""
        return {"payments": {k: asdict(v) for k, v in self.payments.items()}}


class InventoryService(ShopService):
    """Inventory: available units per SKU; applies `ReleaseStock`.

    Args:
        stock: initial available units per SKU (`INITIAL_STOCK` of each catalog SKU).
    """

    service: ClassVar[str] = "inventory"
    handles: ClassVar[tuple[type[Command], ...]] = (ReleaseStock,)

    def __init__(self, bootstrap: str, *, stock: dict[str, int] | None = None, **options: Any):
        super().__init__(bootstrap, **options)
        self.stock: dict[str, int] = (
            dict(stock) if stock is not None else dict.fromkeys(CATALOG, INITIAL_STOCK)
        )
        self.reservations: dict[str, list[OrderLine]] = {}
        self.released: set[str] = set()

    def reserve(self, checkout: Checkout) -> None:
        """Forward flow: take the order's lines out of available stock."""
        for line in checkout.lines:
            self.stock[line.sku] = self.stock.get(line.sku, 0) - line.quantity
        self.reservations[checkout.order_id] = list(checkout.lines)
        self.correlations[checkout.order_id] = checkout.checkout_id
        self._changed()

    def apply(self, command: Command) -> Payload:
        """Put the command's quantities back (applying it twice would add them twice)."""
        assert isinstance(command, ReleaseStock)
        for line in command.lines:
            self.stock[line.sku] = self.stock.get(line.sku, 0) + line.quantity
        self.released.add(command.order_id)
        return StockReleased(order_id=command.order_id, lines=command.lines)

    def state(self) -> dict[str, Any]:
        """`{"stock": {sku: available}, "released": [order_id, ...]}`."""
        return {"stock": dict(self.stock), "released": sorted(self.released)}


SERVICE_CLASSES: dict[str, type[ShopService]] = {
    "orders": OrdersService,
    "payments": PaymentsService,
    "inventory": InventoryService,
}
"""Service name → class."""


class Shop(_Lifecycle):
    """The three services together, plus the forward business flow.

    Args:
        bootstrap: Kafka bootstrap servers.
        topics: the shop's topics (real names by default).
        group_prefix: consumer groups are `<group_prefix>-<service>`.
        on_change: passed to every service.
        **options: passed to every service (e.g. `session_timeout_ms`).

    Example:
        >>> async with Shop("127.0.0.1:9092") as shop:             # doctest: +SKIP
        ...     good = await shop.place_order()
        ...     bad = await shop.place_order(deployment=ORDERS_BAD, legacy_v1=True)
        ...     # ... roll back orders-1.1-b2 with Backout, then:
        ...     assert shop.problems_after_rollback("orders-1.1-b2") == []
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        topics: ShopTopics | None = None,
        group_prefix: str = "shop",
        on_change: Callable[[ShopService], None] | None = None,
        **options: Any,
    ) -> None:
        self.topics = topics or ShopTopics()
        common: dict[str, Any] = {"topics": self.topics, "on_change": on_change, **options}
        self.orders = OrdersService(bootstrap, group_id=f"{group_prefix}-orders", **common)
        self.payments = PaymentsService(bootstrap, group_id=f"{group_prefix}-payments", **common)
        self.inventory = InventoryService(bootstrap, group_id=f"{group_prefix}-inventory", **common)
        self.initial_stock = dict(self.inventory.stock)
        self.checkouts: list[Checkout] = []

    @property
    def services(self) -> dict[str, ShopService]:
        """Service name → service."""
        return {"orders": self.orders, "payments": self.payments, "inventory": self.inventory}

    async def start(self) -> None:
        """Start the three services."""
        started: list[ShopService] = []
        try:
            for service in self.services.values():
                await service.start()
                started.append(service)
        except BaseException:
            for service in reversed(started):
                await service.stop()
            raise

    async def stop(self) -> None:
        """Stop the three services."""
        for service in reversed(list(self.services.values())):
            await service.stop()

    async def place_order(
        self,
        *,
        deployment: Deployment = ORDERS_STABLE,
        lines: Sequence[OrderLine] | None = None,
        customer_id: str = "customer-1",
        legacy_v1: bool = False,
        views: int = 1,
    ) -> Checkout:
        """Run one checkout with orders running as `deployment`.

        Orders emits `OrderPlaced` (v1 if `legacy_v1`), payments
        `PaymentCaptured` and inventory `StockReserved` (both caused by it),
        orders `ReceiptEmailed` (caused by the payment) and `views` times
        `OrderViewed`; each service updates its state as it emits. All
        envelopes share the checkout id as `correlation_id` and the order id
        as record key, and carry a `traceparent` of one trace per checkout.
        """
        checkout = build_checkout(
            orders=deployment,
            payments=self.payments.deployment,
            inventory=self.inventory.deployment,
            lines=lines,
            customer_id=customer_id,
            legacy_v1=legacy_v1,
            views=views,
        )
        for envelope in checkout.events:
            service = self.services[envelope.service]
            if envelope.event_type == "OrderPlaced":
                self.orders.record_placed(checkout)
            elif envelope.event_type == "PaymentCaptured":
                self.payments.record_captured(checkout, str(envelope.payload["payment_id"]))
            elif envelope.event_type == "StockReserved":
                self.inventory.reserve(checkout)
            traceparent = checkout.traceparent(envelope).encode()
            await service.publish(envelope, headers=[(TRACEPARENT_HEADER, traceparent)])
        self.checkouts.append(checkout)
        return checkout

    async def place_demo_orders(
        self, count: int, *, deployment: Deployment = ORDERS_STABLE, legacy_every: int = 3
    ) -> list[Checkout]:
        """Place `count` varied orders; every `legacy_every`-th one emits `OrderPlaced` v1."""
        skus = sorted(CATALOG)
        placed: list[Checkout] = []
        for index in range(count):
            legacy = legacy_every > 0 and index % legacy_every == legacy_every - 1
            first = OrderLine(sku=skus[index % len(skus)], quantity=1 + index % 3)
            second = OrderLine(sku=skus[(index + 1) % len(skus)], quantity=1)
            placed.append(
                await self.place_order(
                    deployment=deployment,
                    lines=[first] if legacy else [first, second],
                    customer_id=f"customer-{index % 7 + 1}",
                    legacy_v1=legacy,
                    views=index % 3,
                )
            )
        return placed

    def checkouts_of(self, deployment_id: str) -> list[Checkout]:
        """The checkouts placed through the orders deployment `deployment_id`."""
        return [c for c in self.checkouts if c.orders_deployment.deployment_id == deployment_id]

    def is_undone(self, checkout: Checkout) -> bool:
        """True when the order is cancelled, its payment refunded and its stock released."""
        account = self.payments.payments.get(checkout.order_id)
        return (
            self.orders.orders.get(checkout.order_id) == "cancelled"
            and account is not None
            and account.refunded_cents == account.captured_cents
            and checkout.order_id in self.inventory.released
        )

    def problems_after_rollback(self, deployment_id: str) -> list[str]:
        """What is inconsistent after rolling back `deployment_id` (empty: all good).

        Every checkout of that deployment must be undone exactly (no double
        refund), every other checkout untouched, and the stock must equal the
        initial stock minus what the remaining orders reserved.
        """
        problems: list[str] = []
        for checkout in self.checkouts:
            order_id = checkout.order_id
            status = self.orders.orders.get(order_id)
            account = self.payments.payments.get(order_id)
            refunded = account.refunded_cents if account else 0
            released = order_id in self.inventory.released
            if checkout.orders_deployment.deployment_id == deployment_id:
                if status != "cancelled":
                    problems.append(f"{order_id}: status {status!r}, expected 'cancelled'")
                if refunded != checkout.total_cents:
                    problems.append(
                        f"{order_id}: refunded {refunded} of {checkout.total_cents} cents"
                    )
                if not released:
                    problems.append(f"{order_id}: stock not released")
            else:
                if status != "placed" or refunded or released:
                    problems.append(f"{order_id} (not rolled back) was touched: {status!r}")
        expected = dict(self.initial_stock)
        for checkout in self.checkouts:
            if checkout.orders_deployment.deployment_id != deployment_id:
                for line in checkout.lines:
                    expected[line.sku] = expected.get(line.sku, 0) - line.quantity
        if expected != self.inventory.stock:
            problems.append(f"stock {self.inventory.stock} != expected {expected}")
        return problems

    def snapshot(self) -> dict[str, Any]:
        """Every service's snapshot, by service name."""
        return {name: service.snapshot() for name, service in self.services.items()}


# ---------------------------------------------------------------------------- CLI


def _write_state(path: Path, state: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(partial, path)


def _print_line(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m examples.shop.services` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.shop.services",
        description="Run a demo shop service (or the whole shop) until SIGTERM/SIGINT.",
    )
    parser.add_argument("service", choices=[*SERVICES, "all"], help="what to run")
    parser.add_argument("--broker", required=True, help="Kafka bootstrap servers, HOST:PORT")
    parser.add_argument(
        "--topic-prefix",
        default=os.environ.get(TOPIC_PREFIX_ENV, ""),
        help=f"prefix of every shop topic (default ${TOPIC_PREFIX_ENV} or none)",
    )
    parser.add_argument("--group-prefix", default="shop", help="consumer groups: PREFIX-service")
    parser.add_argument("--deployment-id", help="deployment stamped on events (one service only)")
    parser.add_argument("--service-version", help="version stamped on events (one service only)")
    parser.add_argument(
        "--place-orders",
        type=int,
        default=0,
        metavar="N",
        help=f"with `all`: place N orders as {ORDERS_STABLE.deployment_id} and N as "
        f"{ORDERS_BAD.deployment_id} (every third one as OrderPlaced v1)",
    )
    parser.add_argument("--state-file", type=Path, help="keep a JSON snapshot of the state here")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run what `args` asks for until SIGTERM/SIGINT; return the final snapshot.

    Prints one JSON line `{"event": "ready", ...}` once serving and
    `{"event": "stopped", "state": ...}` at the end.
    """
    topics = ShopTopics(prefix=args.topic_prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    snapshot: Callable[[], dict[str, Any]]
    state_file: Path | None = args.state_file

    def changed(_: ShopService) -> None:
        if state_file is not None:
            _write_state(state_file, snapshot())

    target: Shop | ShopService
    if args.service == "all":
        if args.deployment_id or args.service_version:
            raise SystemExit("--deployment-id/--service-version need a single service")
        shop = Shop(args.broker, topics=topics, group_prefix=args.group_prefix, on_change=changed)
        snapshot, target = shop.snapshot, shop
    else:
        default = DEFAULT_DEPLOYMENTS[args.service]
        deployment = Deployment(
            args.service,
            args.deployment_id or default.deployment_id,
            args.service_version or default.service_version,
        )
        service = SERVICE_CLASSES[args.service](
            args.broker,
            deployment=deployment,
            topics=topics,
            group_id=f"{args.group_prefix}-{args.service}",
            on_change=changed,
        )
        snapshot, target = service.snapshot, service
        if args.place_orders:
            raise SystemExit("--place-orders needs `all`")
    await target.start()
    try:
        if isinstance(target, Shop) and args.place_orders:
            await target.place_demo_orders(args.place_orders, deployment=ORDERS_STABLE)
            await target.place_demo_orders(args.place_orders, deployment=ORDERS_BAD)
        changed(target.orders if isinstance(target, Shop) else target)
        _print_line(
            {
                "event": "ready",
                "service": args.service,
                "topics": topics.all_events(),
                "pid": os.getpid(),
            }
        )
        await stop.wait()
    finally:
        await target.stop()
    final = snapshot()
    changed(target.orders if isinstance(target, Shop) else target)
    _print_line({"event": "stopped", "service": args.service, "state": final})
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m examples.shop.services`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
