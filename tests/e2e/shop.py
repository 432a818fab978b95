"""Event data of the e2e scenarios: checkouts across orders, payments and stock.

A `Checkout` is one saga instance (correlation id = order id): an order
(`ItemOrdered` v1 or v2), a charge and a stock reservation caused by it
(directly, or as a chain order → charge → reservation), optionally an
irreversible e-mail and an ignored page view. It knows which commands a
rollback of its order must produce, and which event caused which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sagas.planner import idempotency_key
from tests.support import e2e_saga
from tests.support.kafka import envelope

STEP_CANCEL = f"{e2e_saga.flow.name}.cancel_item"
STEP_REFUND = f"{e2e_saga.flow.name}.refund"
STEP_RELEASE = f"{e2e_saga.flow.name}.release"


@dataclass(frozen=True, slots=True)
class ExpectedCommand:
    """A command a rollback must send: where, what, and for which event."""

    key: str
    step: str
    service: str
    value: dict[str, Any]
    event_id: str
    confirmed: bool  # the step waits for a confirmation event


@dataclass
class Checkout:
    """One saga instance's events and the compensation it calls for."""

    order_id: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (service, envelope)
    commands: dict[str, ExpectedCommand] = field(default_factory=dict)
    caused_by: dict[str, str] = field(default_factory=dict)  # event id → causing event id
    manual: list[str] = field(default_factory=list)  # irreversible event ids
    ignored: list[str] = field(default_factory=list)

    @property
    def order_event_id(self) -> str:
        """The id of the `ItemOrdered` event."""
        return self.events[0][1]["event_id"]


def checkout(
    order_id: str,
    *,
    orders: str,
    payments: str,
    stock: str,
    version: int = 2,
    chain: bool = False,
    charge: bool = True,
    reserve: bool = True,
    emailed: bool = False,
    viewed: bool = False,
    release_delay: float | None = None,
    occurred_at: datetime | None = None,
) -> Checkout:
    """Build one checkout.

    Args:
        order_id: correlation id and record key of every event.
        orders, payments, stock: deployment ids of the three services.
        version: `ItemOrdered` schema version (1 is upcast to 2 by the saga).
        chain: the reservation is caused by the charge (orders → payments →
            stock) instead of by the order.
        charge: emit a charge at all (without one, `chain` and `reserve` are ignored).
        reserve: emit a reservation at all.
        emailed: add an irreversible `Emailed` (a manual action in a rollback).
        viewed: add an ignored `Viewed`.
        release_delay: seconds the release handler sleeps (stretches a rollback).
        occurred_at: time of every event (default: now).
    """
    result = Checkout(order_id)

    def emit(
        service: str, deployment: str, event_type: str, payload: dict[str, Any], **kw: Any
    ) -> dict[str, Any]:
        document = envelope(
            event_type,
            service=service,
            deployment_id=deployment,
            service_version=deployment.split("-")[-1] if "-" in deployment else "1",
            payload=payload,
            correlation_id=order_id,
            key=order_id,
            occurred_at=occurred_at,
            **kw,
        )
        result.events.append((service, document))
        if document.get("causation_id"):
            result.caused_by[document["event_id"]] = document["causation_id"]
        return document

    def expect(document: dict[str, Any], step: str, service: str, command: str, confirm: bool):
        key = idempotency_key(document["event_id"], step)
        result.commands[key] = ExpectedCommand(
            key=key,
            step=step,
            service=service,
            value={"command": command, "order_id": order_id},
            event_id=document["event_id"],
            confirmed=confirm,
        )

    payload = {"order": order_id} if version == 1 else {"order_id": order_id, "quantity": 2}
    order = emit("orders", orders, "ItemOrdered", payload, schema_version=version)
    expect(order, STEP_CANCEL, "orders", "Cancel", True)
    if not charge:
        reserve = False
    else:
        charged = emit(
            "payments", payments, "Charged", {"order_id": order_id}, causation_id=order["event_id"]
        )
        expect(charged, STEP_REFUND, "payments", "Refund", True)
    if reserve:
        reservation: dict[str, Any] = {"order_id": order_id}
        if release_delay is not None:
            reservation["release_delay"] = release_delay
        reserved = emit(
            "stock",
            stock,
            "Reserved",
            reservation,
            causation_id=(charged if chain else order)["event_id"],
        )
        expect(reserved, STEP_RELEASE, "stock", "Release", False)
    if emailed:
        mail = emit(
            "orders",
            orders,
            "Emailed",
            {"to": f"{order_id}@example.com"},
            causation_id=order["event_id"],
        )
        result.manual.append(mail["event_id"])
    if viewed:
        view = emit("orders", orders, "Viewed", {"page": order_id})
        result.ignored.append(view["event_id"])
    return result


def expected_commands(checkouts: list[Checkout]) -> dict[str, ExpectedCommand]:
    """Every command the rollback of these checkouts must send, by idempotency key."""
    return {key: c for checkout in checkouts for key, c in checkout.commands.items()}


def type_counts(checkouts: list[Checkout], deployment: str) -> dict[str, int]:
    """`by_type` of `deployment` in GET /api/deployments once all events are tracked."""
    counts: dict[str, int] = {}
    for checkout_ in checkouts:
        for _service, document in checkout_.events:
            if document["deployment_id"] == deployment:
                name = f"{document['event_type']} v{document['schema_version']}"
                counts[name] = counts.get(name, 0) + 1
    return counts
