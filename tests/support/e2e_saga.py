"""A small saga module for end-to-end tests: three services, two versions of one type.

Command topics are `<prefix>orders.commands` etc., where the prefix comes from
`E2E_COMMAND_PREFIX` (default `e2e.`) when a handler runs, so that every test
worker on the shared session broker can send to topics of its own.
"""

from __future__ import annotations

import asyncio
import os
from typing import ClassVar

from pydantic import BaseModel

from sagas import CompensationContext, RetryPolicy, Saga

flow = Saga("e2eflow")

COMMAND_PREFIX_ENV = "E2E_COMMAND_PREFIX"
SERVICES = ("orders", "payments", "stock")


def command_topic(service: str, prefix: str | None = None) -> str:
    """The command topic of `service` (the prefix defaults to `$E2E_COMMAND_PREFIX`)."""
    if prefix is None:
        prefix = os.environ.get(COMMAND_PREFIX_ENV, "e2e.")
    return f"{prefix}{service}.commands"


class ItemOrderedV1(BaseModel):
    __event_type__: ClassVar[str] = "ItemOrdered"
    __schema_version__: ClassVar[int] = 1
    order: str


class ItemOrdered(BaseModel):
    __event_type__: ClassVar[str] = "ItemOrdered"
    __schema_version__: ClassVar[int] = 2
    order_id: str
    quantity: int


@flow.upcaster("ItemOrdered", from_version=1)
def item_ordered_v1_to_v2(payload: dict[str, object]) -> dict[str, object]:
    return {"order_id": payload["order"], "quantity": 1}


@flow.compensate(ItemOrdered, confirm="ItemCancelled", confirm_timeout=30)
async def cancel_item(event: ItemOrdered, ctx: CompensationContext) -> None:
    await ctx.send(
        command_topic("orders"),
        {"command": "Cancel", "order_id": event.order_id},
        key=event.order_id,
    )


@flow.compensate(
    "Charged",
    confirm="Refunded",
    confirm_timeout=30,
    retry=RetryPolicy(max_attempts=3, initial_delay=0.1),
)
async def refund(event: dict[str, object], ctx: CompensationContext) -> None:
    await ctx.send(
        command_topic("payments"),
        {"command": "Refund", "order_id": event["order_id"]},
        key=str(event["order_id"]),
    )


@flow.compensate("Reserved")
async def release(event: dict[str, object], ctx: CompensationContext) -> None:
    # `release_delay` (seconds) stretches a rollback over time without many
    # events, so a test can kill a worker while compensations are in flight.
    delay = float(str(event.get("release_delay", 0)))
    if delay > 0:
        await asyncio.sleep(delay)
    await ctx.send(
        command_topic("stock"),
        {"command": "Release", "order_id": event["order_id"]},
        key=str(event["order_id"]),
    )


flow.irreversible("Emailed", action="Send a correction e-mail")
flow.ignore("Viewed")
