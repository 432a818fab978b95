"""The benchmark's saga module: four steps over three services, chained by causation.

One saga instance (one `correlation_id`) is a forward chain of four events,
each caused by the one before it:

| step | service | event | compensation command | confirmation |
|---|---|---|---|---|
| 1 | orders | `BenchOrderPlaced` | `CancelOrder` | `BenchOrderCancelled` |
| 2 | payments | `BenchPaymentCaptured` | `RefundPayment` | `BenchPaymentRefunded` |
| 3 | stock | `BenchStockReserved` | `ReleaseStock` | `BenchStockReleased` |
| 4 | orders | `BenchOrderConfirmed` | `UnconfirmOrder` | `BenchOrderUnconfirmed` |

Every step declares a confirmation, so undoing one instance is four strictly
sequential round trips (4 → 3 → 2 → 1, each waiting for the previous
one's confirmation): the worst case for confirmation latency.

Command topics are `<prefix><service>.commands` and event topics
`<prefix><service>.events`, with the prefix from `$BENCH_TOPIC_PREFIX` so each
benchmark run has topics of its own. Load it with `BACKOUT_SAGAS=bench.saga`.
"""

from __future__ import annotations

import os
from typing import ClassVar

from pydantic import BaseModel

from sagas import CompensationContext, Saga

PREFIX_ENV = "BENCH_TOPIC_PREFIX"
SERVICES = ("orders", "payments", "stock")

bench = Saga("bench")


def topic_prefix() -> str:
    """The current run's topic prefix (`$BENCH_TOPIC_PREFIX`, default `bench.`)."""
    return os.environ.get(PREFIX_ENV, "bench.")


def command_topic(service: str, prefix: str | None = None) -> str:
    """Where `service` reads commands."""
    return f"{topic_prefix() if prefix is None else prefix}{service}.commands"


def event_topic(service: str, prefix: str | None = None) -> str:
    """Where `service` emits events (tracked by the worker)."""
    return f"{topic_prefix() if prefix is None else prefix}{service}.events"


class BenchOrderPlaced(BaseModel):
    __event_type__: ClassVar[str] = "BenchOrderPlaced"
    order_id: str
    customer_id: str
    total_cents: int


class BenchPaymentCaptured(BaseModel):
    __event_type__: ClassVar[str] = "BenchPaymentCaptured"
    order_id: str
    payment_id: str
    amount_cents: int


class BenchStockReserved(BaseModel):
    __event_type__: ClassVar[str] = "BenchStockReserved"
    order_id: str
    sku: str
    quantity: int


class BenchOrderConfirmed(BaseModel):
    __event_type__: ClassVar[str] = "BenchOrderConfirmed"
    order_id: str


# (event type, service, command name, confirmation type), in forward order.
STEPS = (
    ("BenchOrderPlaced", "orders", "CancelOrder", "BenchOrderCancelled"),
    ("BenchPaymentCaptured", "payments", "RefundPayment", "BenchPaymentRefunded"),
    ("BenchStockReserved", "stock", "ReleaseStock", "BenchStockReleased"),
    ("BenchOrderConfirmed", "orders", "UnconfirmOrder", "BenchOrderUnconfirmed"),
)
CONFIRMATION_OF = {command: confirm for _, _, command, confirm in STEPS}


@bench.compensate(BenchOrderPlaced, confirm="BenchOrderCancelled")
async def cancel_order(event: BenchOrderPlaced, ctx: CompensationContext) -> None:
    await ctx.send(
        command_topic("orders"),
        {"command": "CancelOrder", "order_id": event.order_id},
        key=event.order_id,
    )


@bench.compensate(BenchPaymentCaptured, confirm="BenchPaymentRefunded")
async def refund_payment(event: BenchPaymentCaptured, ctx: CompensationContext) -> None:
    await ctx.send(
        command_topic("payments"),
        {"command": "RefundPayment", "order_id": event.order_id, "amount": event.amount_cents},
        key=event.order_id,
    )


@bench.compensate(BenchStockReserved, confirm="BenchStockReleased")
async def release_stock(event: BenchStockReserved, ctx: CompensationContext) -> None:
    await ctx.send(
        command_topic("stock"),
        {"command": "ReleaseStock", "order_id": event.order_id, "sku": event.sku},
        key=event.order_id,
    )


@bench.compensate(BenchOrderConfirmed, confirm="BenchOrderUnconfirmed")
async def unconfirm_order(event: BenchOrderConfirmed, ctx: CompensationContext) -> None:
    await ctx.send(
        command_topic("orders"),
        {"command": "UnconfirmOrder", "order_id": event.order_id},
        key=event.order_id,
    )
