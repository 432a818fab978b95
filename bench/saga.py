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
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

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
MODELS: dict[str, type[BaseModel]] = {
    model.__event_type__: model
    for model in (BenchOrderPlaced, BenchPaymentCaptured, BenchStockReserved, BenchOrderConfirmed)
}
# Per command: the name of its step (`bench.<name>`) and what the command
# carries besides `order_id` (command field -> event field).
COMMANDS: dict[str, tuple[str, dict[str, str]]] = {
    "CancelOrder": ("cancel_order", {}),
    "RefundPayment": ("refund_payment", {"amount": "amount_cents"}),
    "ReleaseStock": ("release_stock", {"sku": "sku"}),
    "UnconfirmOrder": ("unconfirm_order", {}),
}


def _compensation(
    service: str, command: str
) -> Callable[[Any, CompensationContext], Awaitable[None]]:
    """The step that sends `command` to `service`, keyed by the order."""
    name, carried = COMMANDS[command]

    async def compensate(event: Any, ctx: CompensationContext) -> None:
        fields = {field: getattr(event, source) for field, source in carried.items()}
        await ctx.send(
            command_topic(service),
            {"command": command, "order_id": event.order_id, **fields},
            key=event.order_id,
        )

    compensate.__name__ = compensate.__qualname__ = name  # steps are named after handlers
    return compensate


for _event_type, _service, _command, _confirm in STEPS:
    bench.compensate(MODELS[_event_type], confirm=_confirm)(_compensation(_service, _command))
