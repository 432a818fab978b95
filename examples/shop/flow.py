"""The shop's forward business flow as plain data: the envelopes one checkout emits.

Nothing here touches Kafka: `build_checkout` returns the envelopes of one
checkout (in the order the services emit them, all sharing the checkout id
as `correlation_id` and the order id as `key`), so the same flow feeds the
live services (`examples.shop.services.Shop`) and saga unit tests
(`sagas.testing.SagaTestHarness`).

Causation of one checkout::

    OrderPlaced (orders)
    ├── PaymentCaptured (payments)
    │   └── ReceiptEmailed (orders)
    ├── StockReserved (inventory)
    └── OrderViewed (n times, orders)
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from examples.shop.schemas import (
    OrderLine,
    OrderPlaced,
    OrderPlacedV1,
    OrderViewed,
    Payload,
    PaymentCaptured,
    ReceiptEmailed,
    StockReserved,
)
from sagas.definition import event_type_of, schema_version_of
from schemas import utc_now
from schemas.envelope import EventEnvelope


@dataclass(frozen=True, slots=True)
class Deployment:
    """A rollout of one service: what every event it emits is stamped with."""

    service: str
    deployment_id: str
    service_version: str


ORDERS_STABLE = Deployment("orders", "orders-1.0-a1", "1.0")
"""The good orders release."""
ORDERS_BAD = Deployment("orders", "orders-1.1-b2", "1.1")
"""The bad orders release the demo rolls back."""
PAYMENTS_STABLE = Deployment("payments", "payments-3.2-c3", "3.2")
"""The payments release."""
INVENTORY_STABLE = Deployment("inventory", "inventory-2.0-d4", "2.0")
"""The inventory release."""

DEFAULT_DEPLOYMENTS: dict[str, Deployment] = {
    "orders": ORDERS_STABLE,
    "payments": PAYMENTS_STABLE,
    "inventory": INVENTORY_STABLE,
}
"""The deployment each service runs as unless told otherwise."""

CATALOG: dict[str, int] = {
    "sku-espresso-beans": 1_299,
    "sku-burr-grinder": 8_900,
    "sku-paper-filters": 450,
    "sku-travel-mug": 1_500,
}
"""Unit prices in cents."""

INITIAL_STOCK = 1_000
"""Units of every catalog SKU the inventory starts with."""

CURRENCY = "EUR"
"""The shop's currency."""


def traceparent_for(trace_id: str, event_id: str) -> str:
    """A W3C `traceparent` in trace `trace_id` whose span id derives from `event_id`."""
    span_id = hashlib.sha256(event_id.encode()).hexdigest()[:16]
    return f"00-{trace_id}-{span_id}-01"


def make_envelope(
    payload: Payload,
    *,
    deployment: Deployment,
    correlation_id: str | None,
    key: str | None,
    causation_id: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> EventEnvelope:
    """Wrap a payload model in a valid envelope stamped with `deployment`.

    The event type and schema version come from the model's `__event_type__`
    and `__schema_version__`.
    """
    model = type(payload)
    return EventEnvelope(
        event_id=event_id or str(uuid.uuid4()),
        event_type=event_type_of(model),
        schema_version=schema_version_of(model),
        service=deployment.service,
        service_version=deployment.service_version,
        deployment_id=deployment.deployment_id,
        occurred_at=occurred_at or utc_now(),
        correlation_id=correlation_id,
        causation_id=causation_id,
        key=key,
        payload=payload.model_dump(mode="json"),
    )


@dataclass(frozen=True, slots=True)
class Checkout:
    """One checkout: its order, and the envelopes emitted for it in emission order."""

    checkout_id: str
    order_id: str
    customer_id: str
    orders_deployment: Deployment
    lines: tuple[OrderLine, ...]
    total_cents: int
    currency: str
    trace_id: str
    events: tuple[EventEnvelope, ...] = field(default_factory=tuple)

    def of_type(self, event_type: str) -> list[EventEnvelope]:
        """The envelopes of one event type."""
        return [e for e in self.events if e.event_type == event_type]

    def one(self, event_type: str) -> EventEnvelope:
        """The single envelope of `event_type` (raises `LookupError` if not exactly one)."""
        found = self.of_type(event_type)
        if len(found) != 1:
            raise LookupError(f"checkout {self.checkout_id} has {len(found)} {event_type} events")
        return found[0]

    def traceparent(self, envelope: EventEnvelope) -> str:
        """The `traceparent` header an envelope of this checkout is published with."""
        return traceparent_for(self.trace_id, envelope.event_id)


def build_checkout(
    *,
    orders: Deployment = ORDERS_STABLE,
    payments: Deployment = PAYMENTS_STABLE,
    inventory: Deployment = INVENTORY_STABLE,
    lines: Sequence[OrderLine] | None = None,
    customer_id: str = "customer-1",
    legacy_v1: bool = False,
    views: int = 1,
    order_id: str | None = None,
    checkout_id: str | None = None,
    start: datetime | None = None,
    spacing: timedelta = timedelta(milliseconds=1),
) -> Checkout:
    """The envelopes of one checkout placed through the `orders` deployment.

    Args:
        orders, payments, inventory: the deployments emitting each service's events.
        lines: the order lines (one espresso-beans line of 2 by default); SKUs
            must be in `CATALOG`.
        customer_id: who ordered.
        legacy_v1: emit `OrderPlaced` v1 (one line only, no customer/currency).
        views: how many `OrderViewed` events to add.
        order_id, checkout_id: fixed ids (random by default).
        start: `occurred_at` of the first event (now by default); each later
            event is `spacing` later, so the events are strictly ordered.
        spacing: time between consecutive events.

    Raises:
        ValueError: an unknown SKU, or `legacy_v1` with more than one line.
    """
    chosen = tuple(lines or (OrderLine(sku="sku-espresso-beans", quantity=2),))
    unknown = [line.sku for line in chosen if line.sku not in CATALOG]
    if unknown:
        raise ValueError(f"unknown SKUs {unknown}; the catalog has {sorted(CATALOG)}")
    if legacy_v1 and len(chosen) != 1:
        raise ValueError("OrderPlaced v1 has exactly one line")
    order = order_id or f"order-{uuid.uuid4().hex[:12]}"
    checkout = checkout_id or f"checkout-{uuid.uuid4().hex[:12]}"
    total = sum(CATALOG[line.sku] * line.quantity for line in chosen)
    first = start or utc_now()
    times = (first + spacing * i for i in range(4 + views))

    def envelope(payload: Payload, deployment: Deployment, cause: str | None) -> EventEnvelope:
        return make_envelope(
            payload,
            deployment=deployment,
            correlation_id=checkout,
            key=order,
            causation_id=cause,
            occurred_at=next(times),
        )

    placed_payload: Payload
    if legacy_v1:
        placed_payload = OrderPlacedV1(
            order_id=order, sku=chosen[0].sku, quantity=chosen[0].quantity, amount_cents=total
        )
    else:
        placed_payload = OrderPlaced(
            order_id=order,
            customer_id=customer_id,
            lines=list(chosen),
            total_cents=total,
            currency=CURRENCY,
        )
    placed = envelope(placed_payload, orders, None)
    captured = envelope(
        PaymentCaptured(
            order_id=order,
            payment_id=f"pay-{order.removeprefix('order-')}",
            amount_cents=total,
            currency=CURRENCY,
        ),
        payments,
        placed.event_id,
    )
    reserved = envelope(
        StockReserved(order_id=order, lines=list(chosen)), inventory, placed.event_id
    )
    receipt = envelope(
        ReceiptEmailed(order_id=order, customer_id=customer_id, email=f"{customer_id}@example.com"),
        orders,
        captured.event_id,
    )
    viewed = [
        envelope(OrderViewed(order_id=order, viewer=customer_id), orders, placed.event_id)
        for _ in range(views)
    ]
    return Checkout(
        checkout_id=checkout,
        order_id=order,
        customer_id=customer_id,
        orders_deployment=orders,
        lines=chosen,
        total_cents=total,
        currency=CURRENCY,
        trace_id=uuid.uuid4().hex,
        events=(placed, captured, reserved, receipt, *viewed),
    )
