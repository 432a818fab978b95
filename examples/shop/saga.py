"""The checkout saga: how to undo what a checkout did in the demo shop.

Load it in a worker with `BACKOUT_SAGAS=examples.shop.saga`. Forward order of
a checkout: `OrderPlaced` (orders) → `PaymentCaptured` (payments) and
`StockReserved` (inventory) → `ReceiptEmailed` (orders); `OrderViewed` may
come at any time. Undoing it:

| event | compensation | confirmation |
|---|---|---|
| `OrderPlaced` v2 (v1 upcast) | `CancelOrder` → `orders.commands` | `OrderCancelled` |
| `PaymentCaptured` | `RefundPayment` → `payments.commands` (8 attempts) | `PaymentRefunded` |
| `StockReserved` | `ReleaseStock` → `inventory.commands` | `StockReleased` |
| `ReceiptEmailed` | irreversible: an operator sends a correction e-mail | — |
| `OrderViewed` | ignored (read-only) | — |

Command topics are `ShopTopics.from_env()`: the real names unless
`$SHOP_TOPIC_PREFIX` is set (tests use a prefix so parallel runs do not
collide). `build_checkout_saga` builds the same saga for any topics.
"""

from __future__ import annotations

from typing import Any

from examples.shop.schemas import (
    CancelOrder,
    OrderPlaced,
    PaymentCaptured,
    RefundPayment,
    ReleaseStock,
    ShopTopics,
    StockReserved,
)
from sagas.context import CompensationContext
from sagas.definition import Saga
from sagas.retry import RetryPolicy

RECEIPT_ACTION = (
    "Send the customer a correction e-mail: the order in the receipt was cancelled "
    "by a rollback and the payment refunded."
)
"""Operator instruction listed for every `ReceiptEmailed` a rollback covers."""

LEGACY_CUSTOMER_ID = "unknown"
"""Customer id given to upcast v1 orders (v1 did not record the customer)."""

LEGACY_CURRENCY = "EUR"
"""Currency of every v1 order (the legacy checkout only sold in euros)."""


def order_placed_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """Upcast an `OrderPlaced` v1 payload (one SKU) to v2 (lines, customer, currency)."""
    return {
        "order_id": payload["order_id"],
        "customer_id": payload.get("customer_id", LEGACY_CUSTOMER_ID),
        "lines": [{"sku": payload["sku"], "quantity": payload["quantity"]}],
        "total_cents": payload["amount_cents"],
        "currency": payload.get("currency", LEGACY_CURRENCY),
    }


def _reason(ctx: CompensationContext) -> str:
    return f"rollback {ctx.rollback_id} of {ctx.deployment_id}"


def build_checkout_saga(topics: ShopTopics | None = None, *, name: str = "checkout") -> Saga:
    """Build the checkout saga sending its commands to `topics` (the real names by default).

    Args:
        topics: where the shop's command topics are.
        name: the saga's name (part of every idempotency key: keep it stable).
    """
    shop = topics or ShopTopics()
    saga = Saga(name)

    @saga.compensate(OrderPlaced, confirm="OrderCancelled")
    async def cancel_order(event: OrderPlaced, ctx: CompensationContext) -> None:
        """Cancel the order in the orders service."""
        command = CancelOrder(
            order_id=event.order_id,
            correlation_id=ctx.envelope.correlation_id,
            reason=_reason(ctx),
        )
        await ctx.send(shop.orders_commands, command, key=event.order_id)

    @saga.compensate(PaymentCaptured, confirm="PaymentRefunded", retry=RetryPolicy(max_attempts=8))
    async def refund_payment(event: PaymentCaptured, ctx: CompensationContext) -> None:
        """Refund the captured amount in the payments service."""
        command = RefundPayment(
            order_id=event.order_id,
            correlation_id=ctx.envelope.correlation_id,
            reason=_reason(ctx),
            payment_id=event.payment_id,
            amount_cents=event.amount_cents,
            currency=event.currency,
        )
        await ctx.send(shop.payments_commands, command, key=event.order_id)

    @saga.compensate(StockReserved, confirm="StockReleased")
    async def release_stock(event: StockReserved, ctx: CompensationContext) -> None:
        """Put the reserved quantities back into available stock."""
        command = ReleaseStock(
            order_id=event.order_id,
            correlation_id=ctx.envelope.correlation_id,
            reason=_reason(ctx),
            lines=event.lines,
        )
        await ctx.send(shop.inventory_commands, command, key=event.order_id)

    saga.irreversible("ReceiptEmailed", action=RECEIPT_ACTION)
    saga.ignore("OrderViewed")
    saga.upcaster("OrderPlaced", from_version=1)(order_placed_v1_to_v2)
    saga.validate()
    return saga


checkout = build_checkout_saga(ShopTopics.from_env())
"""The checkout saga, sending to the real command topics (or `$SHOP_TOPIC_PREFIX`-ed ones)."""
