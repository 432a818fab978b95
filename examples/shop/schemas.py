"""Payload models, commands and topic names of the demo shop.

Every event payload model carries the event type and payload schema version
it stands for as the class attributes `__event_type__` / `__schema_version__`
(read by `sagas.definition`). `OrderPlaced` exists in two versions: v1
(`OrderPlacedV1`, one line per order, still emitted by the legacy checkout)
and v2 (`OrderPlaced`, several lines, customer and currency); the checkout
saga upcasts v1 to v2.

Commands are the JSON objects the checkout saga sends to the owning service,
`{"command": "<name>", ...}`, keyed by order id. Each service answers an
applied command with a confirmation event (`OrderCancelled`,
`PaymentRefunded`, `StockReleased`) whose `causation_id` is the command's
`backout-idempotency-key`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

# ------------------------------------------------------------------- topic names

ORDERS_EVENTS = "orders.events"
PAYMENTS_EVENTS = "payments.events"
INVENTORY_EVENTS = "inventory.events"
ORDERS_COMMANDS = "orders.commands"
PAYMENTS_COMMANDS = "payments.commands"
INVENTORY_COMMANDS = "inventory.commands"

SERVICES: tuple[str, ...] = ("orders", "payments", "inventory")
"""The shop's services; each owns `<service>.events` and `<service>.commands`."""

TOPIC_PREFIX_ENV = "SHOP_TOPIC_PREFIX"
"""Environment variable read by `ShopTopics.from_env` (and so by the saga module)."""


@dataclass(frozen=True, slots=True)
class ShopTopics:
    """The shop's topic names, optionally prefixed so parallel runs do not collide.

    `ShopTopics()` gives the real names (`orders.events`, `orders.commands`, ...);
    `ShopTopics(prefix="t1.")` gives `t1.orders.events`, ... Event topics keep
    the `.events` suffix, so they match Backout's default tracked-topic pattern.
    """

    prefix: str = ""

    @classmethod
    def from_env(cls) -> ShopTopics:
        """Topics with the prefix from `$SHOP_TOPIC_PREFIX` (empty when unset)."""
        return cls(prefix=os.environ.get(TOPIC_PREFIX_ENV, ""))

    def events(self, service: str) -> str:
        """The event topic of `service` (`orders`, `payments` or `inventory`)."""
        return f"{self.prefix}{_known(service)}.events"

    def commands(self, service: str) -> str:
        """The command topic of `service`."""
        return f"{self.prefix}{_known(service)}.commands"

    @property
    def orders_events(self) -> str:
        """`orders.events`, prefixed."""
        return self.events("orders")

    @property
    def payments_events(self) -> str:
        """`payments.events`, prefixed."""
        return self.events("payments")

    @property
    def inventory_events(self) -> str:
        """`inventory.events`, prefixed."""
        return self.events("inventory")

    @property
    def orders_commands(self) -> str:
        """`orders.commands`, prefixed."""
        return self.commands("orders")

    @property
    def payments_commands(self) -> str:
        """`payments.commands`, prefixed."""
        return self.commands("payments")

    @property
    def inventory_commands(self) -> str:
        """`inventory.commands`, prefixed."""
        return self.commands("inventory")

    def all_events(self) -> list[str]:
        """Every event topic (what a Backout worker tracks for the shop)."""
        return [self.events(s) for s in SERVICES]

    def all_commands(self) -> list[str]:
        """Every command topic."""
        return [self.commands(s) for s in SERVICES]


DEFAULT_TOPICS = ShopTopics()


def _known(service: str) -> str:
    if service not in SERVICES:
        raise ValueError(f"unknown shop service {service!r}; expected one of {SERVICES}")
    return service


# ---------------------------------------------------------------- payload models


class Payload(BaseModel):
    """Base of the shop's payload models: unknown fields ignored (forward compatible)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class OrderLine(Payload):
    """One line of an order."""

    sku: str = Field(min_length=1)
    quantity: int = Field(ge=1)


class OrderPlacedV1(Payload):
    """v1 of `OrderPlaced`: one SKU per order (the legacy checkout still emits it)."""

    __event_type__: ClassVar[str] = "OrderPlaced"
    __schema_version__: ClassVar[int] = 1

    order_id: str
    sku: str
    quantity: int = Field(ge=1)
    amount_cents: int = Field(ge=0)


class OrderPlaced(Payload):
    """v2 of `OrderPlaced`: several lines, the customer and the currency."""

    __event_type__: ClassVar[str] = "OrderPlaced"
    __schema_version__: ClassVar[int] = 2

    order_id: str
    customer_id: str
    lines: list[OrderLine] = Field(min_length=1)
    total_cents: int = Field(ge=0)
    currency: str = Field(min_length=3, max_length=3)


class PaymentCaptured(Payload):
    """The payment service captured the order's amount."""

    __event_type__: ClassVar[str] = "PaymentCaptured"
    __schema_version__: ClassVar[int] = 1

    order_id: str
    payment_id: str
    amount_cents: int = Field(ge=0)
    currency: str = Field(min_length=3, max_length=3)


class StockReserved(Payload):
    """The inventory service took the order's lines out of available stock."""

    __event_type__: ClassVar[str] = "StockReserved"
    __schema_version__: ClassVar[int] = 1

    order_id: str
    lines: list[OrderLine] = Field(min_length=1)


class ReceiptEmailed(Payload):
    """The customer was sent a receipt (cannot be unsent: irreversible)."""

    __event_type__: ClassVar[str] = "ReceiptEmailed"
    __schema_version__: ClassVar[int] = 1

    order_id: str
    customer_id: str
    email: str


class OrderViewed(Payload):
    """Someone looked at the order (read-only: nothing to undo)."""

    __event_type__: ClassVar[str] = "OrderViewed"
    __schema_version__: ClassVar[int] = 1

    order_id: str
    viewer: str


# ---------------------------------------------------------- confirmation events


class OrderCancelled(Payload):
    """Confirmation of `CancelOrder`."""

    __event_type__: ClassVar[str] = "OrderCancelled"
    __schema_version__: ClassVar[int] = 1

    order_id: str
    previous_status: str | None = None
    reason: str | None = None


class PaymentRefunded(Payload):
    """Confirmation of `RefundPayment`."""

    __event_type__: ClassVar[str] = "PaymentRefunded"
    __schema_version__: ClassVar[int] = 1

    order_id: str
    payment_id: str | None = None
    amount_cents: int = Field(ge=0)
    currency: str


class StockReleased(Payload):
    """Confirmation of `ReleaseStock`."""

    __event_type__: ClassVar[str] = "StockReleased"
    __schema_version__: ClassVar[int] = 1

    order_id: str
    lines: list[OrderLine]


# ---------------------------------------------------------------------- commands


class Command(Payload):
    """Fields every shop command has: the order it is about and its saga instance."""

    order_id: str
    correlation_id: str | None = None
    reason: str | None = None


class CancelOrder(Command):
    """Sent to `orders.commands` to undo an `OrderPlaced`."""

    command: Literal["CancelOrder"] = "CancelOrder"


class RefundPayment(Command):
    """Sent to `payments.commands` to undo a `PaymentCaptured`."""

    command: Literal["RefundPayment"] = "RefundPayment"
    payment_id: str | None = None
    amount_cents: int = Field(ge=0)
    currency: str


class ReleaseStock(Command):
    """Sent to `inventory.commands` to undo a `StockReserved`."""

    command: Literal["ReleaseStock"] = "ReleaseStock"
    lines: list[OrderLine] = Field(min_length=1)


AnyCommand = Annotated[CancelOrder | RefundPayment | ReleaseStock, Field(discriminator="command")]
"""Any shop command, told apart by its `command` field."""
