"""A small saga module for end-to-end tests: three services, two versions of one type."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from sagas import CompensationContext, RetryPolicy, Saga

flow = Saga("e2eflow")

COMMANDS = {"orders": "e2e.orders.commands", "payments": "e2e.payments.commands",
            "stock": "e2e.stock.commands"}


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
    await ctx.send(COMMANDS["orders"], {"command": "Cancel", "order_id": event.order_id},
                   key=event.order_id)


@flow.compensate("Charged", confirm="Refunded", confirm_timeout=30,
                 retry=RetryPolicy(max_attempts=3, initial_delay=0.1))
async def refund(event: dict[str, object], ctx: CompensationContext) -> None:
    await ctx.send(COMMANDS["payments"], {"command": "Refund", "order_id": event["order_id"]},
                   key=str(event["order_id"]))


@flow.compensate("Reserved")
async def release(event: dict[str, object], ctx: CompensationContext) -> None:
    await ctx.send(COMMANDS["stock"], {"command": "Release", "order_id": event["order_id"]},
                   key=str(event["order_id"]))


flow.irreversible("Emailed", action="Send a correction e-mail")
flow.ignore("Viewed")
