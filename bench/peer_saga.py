"""The peer row's saga module: two idempotent steps, no confirmations.

The issue's peer workload is "N instances x 2 idempotent steps", run by
Backout and by DBOS against the same PostgreSQL. One instance is a forward
chain of two events, the second caused by the first:

| step | service | event | compensation command |
|---|---|---|---|
| 1 | orders | `PeerOrderPlaced` | `CancelOrder` |
| 2 | payments | `PeerPaymentCaptured` | `RefundPayment` |

Undoing an instance is step 2's command, then step 1's (children before
parents), as DBOS's workflow does (`bench/peer_dbos.py`). Neither side waits
for a confirmation: DBOS has no such notion without a consumer of its own,
so the steps here declare none and a compensation is done once its command
is acknowledged by the broker and its outcome is in the ledger.

Commands go to `<prefix>peer.<service>.commands`, the topics DBOS writes to,
with the prefix from `$BENCH_TOPIC_PREFIX`. Load it with
`BACKOUT_SAGAS=bench.peer_saga`.
"""

from __future__ import annotations

from typing import ClassVar

from bench.saga import BenchOrderPlaced, BenchPaymentCaptured, topic_prefix
from sagas import CompensationContext, Saga

peer = Saga("bench-peer")
SERVICES = ("orders", "payments")


def peer_command_topic(service: str, prefix: str | None = None) -> str:
    """Where the peer row's commands for `service` go (Backout's and DBOS's alike)."""
    return f"{topic_prefix() if prefix is None else prefix}peer.{service}.commands"


# The rollback saga's payloads under event types of their own (a type is
# compensated by one saga only).
class PeerOrderPlaced(BenchOrderPlaced):
    __event_type__: ClassVar[str] = "PeerOrderPlaced"


class PeerPaymentCaptured(BenchPaymentCaptured):
    __event_type__: ClassVar[str] = "PeerPaymentCaptured"


# (event type, service, command name, confirmation type), in forward order.
STEPS: tuple[tuple[str, str, str, str | None], ...] = (
    ("PeerOrderPlaced", "orders", "CancelOrder", None),
    ("PeerPaymentCaptured", "payments", "RefundPayment", None),
)


@peer.compensate(PeerOrderPlaced)
async def cancel_order(event: PeerOrderPlaced, ctx: CompensationContext) -> None:
    await ctx.send(
        peer_command_topic("orders"),
        {"command": "CancelOrder", "order_id": event.order_id},
        key=event.order_id,
    )


@peer.compensate(PeerPaymentCaptured)
async def refund_payment(event: PeerPaymentCaptured, ctx: CompensationContext) -> None:
    await ctx.send(
        peer_command_topic("payments"),
        {"command": "RefundPayment", "order_id": event.order_id},
        key=event.order_id,
    )
