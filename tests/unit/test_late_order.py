"""`late_dependencies`: late items ordered among the planned items they relate to.

Pure logic: `TrackedEvent`s in, (waiting key, key it waits for) pairs out.
The executor tests (test_executor.py, `TestLateEvents`) run the same
through a rollback.
"""

from __future__ import annotations

from sagas.late_order import PlanIndex, late_dependencies
from sagas.ledger.records import TrackedEvent
from sagas.planner import plan_compensations
from tests.unit.test_planner import REGISTRY, event


def planned(*events: TrackedEvent) -> tuple[PlanIndex, dict[str, str]]:
    """The plan of `events` as an index, and event id → key."""
    index = PlanIndex()
    keys = {}
    for item in plan_compensations(list(events), REGISTRY).items:
        index.add(item.key, item.event)
        keys[item.event.event_id] = item.key
    return index, keys


def late(*events: TrackedEvent) -> tuple[list[tuple[str, TrackedEvent]], dict[str, str]]:
    """`events` planned on their own, as `RollbackEngine._add_late` plans them."""
    items = plan_compensations(list(events), REGISTRY).items
    return [(i.key, i.event) for i in items], {i.event.event_id: i.key for i in items}


def test_a_late_child_is_undone_before_its_planned_parent() -> None:
    index, keys = planned(event("order", at=0))
    items, late_keys = late(
        event("stock", "StockReserved", at=1, causation_id="order", service="inventory")
    )
    assert late_dependencies(items, index, REGISTRY) == [(keys["order"], late_keys["stock"])]


def test_a_late_parent_is_undone_after_its_planned_children() -> None:
    index, keys = planned(
        event("pay", "PaymentCaptured", at=1, causation_id="order", service="payments"),
        event("stock", "StockReserved", at=2, causation_id="order", service="inventory"),
    )
    items, late_keys = late(event("order", at=0))
    assert sorted(late_dependencies(items, index, REGISTRY)) == sorted(
        [(late_keys["order"], keys["pay"]), (late_keys["order"], keys["stock"])]
    )


def test_a_late_later_step_of_an_instance_comes_before_its_planned_steps() -> None:
    """No causation, one saga instance: reverse step order, the late step first."""
    index, keys = planned(
        event("order", at=0, correlation_id="c1"),
        event("pay", "PaymentCaptured", at=1, correlation_id="c1", service="payments"),
    )
    items, late_keys = late(
        event("stock", "StockReserved", at=2, correlation_id="c1", service="inventory")
    )
    # The instance's chain: stock, then pay, then order; order already waits on pay.
    assert late_dependencies(items, index, REGISTRY) == [(keys["pay"], late_keys["stock"])]


def test_an_unrelated_late_event_changes_nothing() -> None:
    index, _ = planned(event("order", at=0, correlation_id="c1"))
    items, _ = late(event("other", at=1, correlation_id="c2"))
    assert late_dependencies(items, index, REGISTRY) == []


def test_late_items_read_together_are_ordered_among_themselves() -> None:
    """A restarted run reads late items of several batches at once: a late
    grandchild (second batch) still goes before its late parent (first)."""
    index, keys = planned(event("order", at=0))
    first, first_keys = late(
        event("pay", "PaymentCaptured", at=1, causation_id="order", service="payments")
    )
    second, second_keys = late(
        event("stock", "StockReserved", at=2, causation_id="pay", service="inventory")
    )
    for key, late_event in first + second:
        index.add(key, late_event)
    assert sorted(late_dependencies(first + second, index, REGISTRY)) == sorted(
        [
            (keys["order"], first_keys["pay"]),
            (first_keys["pay"], second_keys["stock"]),
        ]
    )


def test_a_late_grandchild_through_an_ignored_event_is_related_by_its_instance() -> None:
    """Ignored events are no plan items: a late event caused by one is related
    to the planned items of its saga instance, which still wait for it."""
    index, keys = planned(event("order", at=0, correlation_id="c1"))
    items, late_keys = late(
        event(
            "stock",
            "StockReserved",
            at=2,
            causation_id="viewed-order",
            correlation_id="c1",
            service="inventory",
        )
    )
    assert late_dependencies(items, index, REGISTRY) == [(keys["order"], late_keys["stock"])]
