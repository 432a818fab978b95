"""Is the shop consistent again? The demo's invariants and the numbers it reports.

The authority is `Shop.problems_after_rollback`; the checks here break the
same invariants down into lines a reader can follow, and add Backout's side:
every planned compensation applied and confirmed, one manual action per
irreversible event, nothing dead-lettered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from consumers.topics import reading
from examples.shop.flow import ORDERS_BAD, ORDERS_STABLE, Checkout
from examples.shop.saga import build_checkout_saga
from examples.shop.services import Shop
from schemas import RollbackState, RollbackStatus


@dataclass(frozen=True, slots=True)
class Check:
    """One invariant, as printed, and whether it holds."""

    text: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Measured:
    """What the demo measured along the way."""

    events_forward: int  # tracked before the alert
    events_total: int  # tracked in the end (confirmations included)
    dead_letters: int
    signal_to_completed: float | None
    signal_to_consistent: float | None
    alert_path: str


@dataclass(frozen=True, slots=True)
class Summary:
    """The outcome of one demo run."""

    good_orders: int
    bad_orders: int
    status: RollbackStatus
    measured: Measured
    expected_compensations: int
    expected_manual: int
    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every invariant holds."""
        return all(c.ok for c in self.checks) and not self.problems


def judge(shop: Shop, status: RollbackStatus, measured: Measured) -> Summary:
    """Check the shop and the rollback's final status after rolling back orders 1.1."""
    bad = shop.checkouts_of(ORDERS_BAD.deployment_id)
    good = shop.checkouts_of(ORDERS_STABLE.deployment_id)
    # Only the saga's declarations are used: which event types are undone, which are manual.
    saga = build_checkout_saga()
    compensated = {event_type for event_type, _version in saga.steps}
    expected = sum(1 for c in bad for e in c.events if e.event_type in compensated)
    manual = sum(1 for c in bad for e in c.events if e.event_type in saga.manual)
    undone = sum(1 for c in bad if shop.is_undone(c))
    untouched = sum(1 for c in good if _untouched(shop, c))
    ended = status.state in (RollbackState.COMPLETED, RollbackState.COMPLETED_WITH_WARNINGS)
    checks = [
        Check(
            f"all {len(bad)} orders of {ORDERS_BAD.deployment_id} cancelled, refunded "
            f"and their stock released ({undone}/{len(bad)})",
            undone == len(bad),
        ),
        Check(
            f"all {len(good)} orders of {ORDERS_STABLE.deployment_id} untouched "
            f"({untouched}/{len(good)})",
            untouched == len(good),
        ),
        Check(
            "stock = initial stock - what the orders of 1.0 reserved",
            shop.inventory.stock == _expected_stock(shop, good),
        ),
        Check(
            f"every planned compensation applied and confirmed: {status.planned} planned, "
            f"{status.applied} applied, {status.confirmed} confirmed (expected {expected})",
            status.planned == status.applied == status.confirmed == expected and not status.failed,
        ),
        Check(
            f"{status.manual} manual actions listed, one per ReceiptEmailed of 1.1 ({manual})",
            status.manual == manual,
        ),
        Check(f"{measured.dead_letters} dead-lettered records", measured.dead_letters == 0),
        Check(f"rollback ended {status.state.value}", ended),
    ]
    return Summary(
        good_orders=len(good),
        bad_orders=len(bad),
        status=status,
        measured=measured,
        expected_compensations=expected,
        expected_manual=manual,
        checks=checks,
        problems=shop.problems_after_rollback(ORDERS_BAD.deployment_id),
    )


def _untouched(shop: Shop, checkout: Checkout) -> bool:
    account = shop.payments.payments.get(checkout.order_id)
    return (
        shop.orders.orders.get(checkout.order_id) == "placed"
        and (account is None or account.refunded_cents == 0)
        and checkout.order_id not in shop.inventory.released
    )


def _expected_stock(shop: Shop, kept: list[Checkout]) -> dict[str, int]:
    expected = dict(shop.initial_stock)
    for checkout in kept:
        for line in checkout.lines:
            expected[line.sku] = expected.get(line.sku, 0) - line.quantity
    return expected


async def count_records(bootstrap: str, topic: str, *, idle: float = 0.6) -> int:
    """How many records `topic` holds, read from the beginning until it stays quiet.

    End offsets of the embedded broker cannot be trusted (BROKER.md), so the
    topic is read until no record came for `idle` seconds.
    """
    async with reading(bootstrap, [topic]) as consumer:
        if not consumer.assignment():
            return 0  # the topic does not exist: nothing was written to it
        count = 0
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle:
            batch = await consumer.getmany(timeout_ms=100)
            if batch:
                quiet_since = time.monotonic()
                count += sum(len(records) for records in batch.values())
        return count
