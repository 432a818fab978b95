"""The planner alone: blast radius events → an ordered `Plan` with dependencies.

No ledger, no clock: `TrackedEvent`s in, a `Plan` out. "A precedes B" below
means B's compensation waits, directly or through other items, on A's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from sagas import planner
from sagas.definition import Saga
from sagas.ledger.records import TrackedEvent
from sagas.planner import IDEMPOTENCY_NAMESPACE, Plan, idempotency_key, plan_compensations
from sagas.registry import SagaRegistry

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class StockReservedV3(BaseModel):
    __event_type__ = "StockReserved"
    __schema_version__ = 3

    sku: str


def _registry() -> SagaRegistry:
    """Three services' event types in one checkout saga, declared in forward order."""
    checkout = Saga("checkout")

    async def cancel_order(event: Any, ctx: Any) -> None: ...
    async def refund(event: Any, ctx: Any) -> None: ...
    async def release_stock(event: Any, ctx: Any) -> None: ...
    async def unship(event: Any, ctx: Any) -> None: ...

    checkout.compensate("OrderPlaced")(cancel_order)
    checkout.compensate("PaymentCaptured", confirm="PaymentRefunded")(refund)
    checkout.compensate(StockReservedV3)(release_stock)
    checkout.compensate("ParcelShipped")(unship)
    checkout.irreversible("ReceiptEmailed", action="Send a correction e-mail to the customer")
    checkout.ignore("OrderViewed")
    checkout.upcaster("StockReserved", from_version=2)(lambda payload: payload)
    return SagaRegistry([checkout])


REGISTRY = _registry()


def event(
    event_id: str,
    event_type: str = "OrderPlaced",
    *,
    at: float = 0.0,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    service: str = "orders",
    version: int | None = None,
) -> TrackedEvent:
    """A tracked event `at` seconds after T0."""
    if version is None:
        version = 3 if event_type == "StockReserved" else 1
    return TrackedEvent(
        event_id=event_id,
        event_type=event_type,
        schema_version=version,
        service=service,
        service_version="1.0",
        deployment_id=f"{service}-1.0",
        occurred_at=T0 + timedelta(seconds=at),
        payload={},
        correlation_id=correlation_id,
        causation_id=causation_id,
    )


def order(plan: Plan) -> list[str]:
    """Event ids of the plan's items, in plan order."""
    return [item.event.event_id for item in plan.items]


def key_of(plan: Plan, event_id: str) -> str:
    (key,) = [item.key for item in plan.items if item.event.event_id == event_id]
    return key


def closure(plan: Plan) -> dict[str, set[str]]:
    """Key → every key it waits on, directly or transitively."""
    direct = {item.key: set(item.depends_on) for item in plan.items}
    result: dict[str, set[str]] = {}

    def visit(key: str, trail: tuple[str, ...]) -> set[str]:
        assert key not in trail, f"dependency cycle through {key}"
        if key not in result:
            found: set[str] = set()
            for dependency in direct[key]:
                found |= {dependency} | visit(dependency, (*trail, key))
            result[key] = found
        return result[key]

    for key in direct:
        visit(key, ())
    return result


def precedes(plan: Plan, first: str, then: str) -> bool:
    """True when `then`'s compensation waits (transitively) on `first`'s."""
    return key_of(plan, first) in closure(plan)[key_of(plan, then)]


def assert_sound(plan: Plan) -> None:
    """Dependencies name planned keys, point backwards in plan order, form no cycle."""
    position = {item.key: item.position for item in plan.items}
    for item in plan.items:
        for dependency in item.depends_on:
            assert dependency in position, f"{item.key} waits on unplanned {dependency}"
            assert position[dependency] < item.position
    closure(plan)


def plan(events: Iterable[TrackedEvent], registry: SagaRegistry = REGISTRY) -> Plan:
    result = plan_compensations(list(events), registry)
    assert_sound(result)
    return result


# ------------------------------------------------------------------- causation


class TestCausation:
    def test_children_come_before_parents_across_services(self) -> None:
        # The order's payment was captured because of it, stock because of the payment.
        events = [
            event("order", "OrderPlaced", at=1, service="orders"),
            event("payment", "PaymentCaptured", at=2, causation_id="order", service="payments"),
            event("stock", "StockReserved", at=3, causation_id="payment", service="inventory"),
        ]
        result = plan(events)
        assert order(result) == ["stock", "payment", "order"]
        items = {item.event.event_id: item for item in result.items}
        assert items["stock"].depends_on == ()
        assert items["payment"].depends_on == (key_of(result, "stock"),)
        assert items["order"].depends_on == (key_of(result, "payment"),)
        assert [item.position for item in result.items] == [0, 1, 2]

    def test_children_come_first_whatever_order_the_input_lists_them_in(self) -> None:
        events = [
            event("stock", "StockReserved", at=3, causation_id="payment", service="inventory"),
            event("order", "OrderPlaced", at=1),
            event("payment", "PaymentCaptured", at=2, causation_id="order", service="payments"),
        ]
        assert order(plan(events)) == ["stock", "payment", "order"]

    def test_every_child_of_a_fan_out_precedes_the_parent(self) -> None:
        events = [
            event("order", "OrderPlaced", at=1),
            event("payment", "PaymentCaptured", at=2, causation_id="order", service="payments"),
            event("stock", "StockReserved", at=3, causation_id="order", service="inventory"),
        ]
        result = plan(events)
        assert order(result)[-1] == "order"
        assert precedes(result, "payment", "order")
        assert precedes(result, "stock", "order")
        # Siblings without a shared instance do not wait on each other.
        assert not precedes(result, "payment", "stock")
        assert not precedes(result, "stock", "payment")

    def test_lying_timestamps_do_not_beat_causation(self) -> None:
        # The child claims to have happened an hour before its parent (clock skew).
        events = [
            event("order", "OrderPlaced", at=3600, correlation_id="c1"),
            event("payment", "PaymentCaptured", at=0, correlation_id="c1", causation_id="order"),
            event("stock", "StockReserved", at=-60, correlation_id="c2", causation_id="payment"),
        ]
        result = plan(events)
        assert order(result) == ["stock", "payment", "order"]
        assert precedes(result, "stock", "payment")
        assert precedes(result, "payment", "order")

    @pytest.mark.parametrize("size", [2, 3, 5])
    def test_a_causation_cycle_still_gives_an_acyclic_plan(self, size: int) -> None:
        # e0 ← e1 ← ... ← e{n-1} ← e0: impossible in reality, possible in bad input.
        ids = [f"e{i}" for i in range(size)]
        events = [
            event(ids[i], "OrderPlaced", at=i, causation_id=ids[(i - 1) % size])
            for i in range(size)
        ]
        # A well-behaved child of the cycle, and a well-behaved parent of nothing.
        events.append(event("child", "ParcelShipped", at=100, causation_id="e0"))
        events.append(event("loner", "OrderPlaced", at=50))
        result = plan(events)  # assert_sound: no cycle among dependencies
        assert sorted(order(result)) == sorted([*ids, "child", "loner"])
        assert precedes(result, "child", "e0")
        # Every edge of the cycle but one is kept: the planner breaks it once.
        kept = sum(precedes(result, ids[i], ids[(i - 1) % size]) for i in range(size))
        assert kept == size - 1
        assert not any(precedes(result, "loner", x) or precedes(result, x, "loner") for x in ids)

    def test_an_event_caused_by_itself_is_planned_once_without_dependencies(self) -> None:
        result = plan([event("selfish", "OrderPlaced", causation_id="selfish")])
        assert order(result) == ["selfish"]
        assert result.items[0].depends_on == ()

    def test_a_parent_outside_the_blast_radius_is_ignored(self) -> None:
        result = plan([event("payment", "PaymentCaptured", causation_id="not-in-the-plan")])
        assert order(result) == ["payment"]
        assert result.items[0].depends_on == ()

    def test_duplicate_events_are_planned_once(self) -> None:
        twice = event("order", "OrderPlaced")
        result = plan([twice, twice])
        assert order(result) == ["order"]
        assert result.events == 1


# ------------------------------------------------------------------- instances


# Random blast radii: times with ties, causes anywhere (later in time, the
# event itself, outside the radius, in cycles).
RADII = st.integers(min_value=1, max_value=25).flatmap(
    lambda n: st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=4),  # time: ties are common
            st.sampled_from(["OrderPlaced", "PaymentCaptured", "ParcelShipped", "OrderViewed"]),
            st.none() | st.integers(min_value=0, max_value=n),  # n: outside the radius
        ),
        min_size=n,
        max_size=n,
    )
)


class TestForwardOrder:
    """The forward order, found by one sort when causes precede their effects
    in time, else by Kahn's algorithm: the same order either way."""

    @given(RADII)
    def test_the_sorted_order_is_the_one_kahns_algorithm_gives(
        self, radius: list[tuple[int, str, int | None]]
    ) -> None:
        by_id = {
            f"e{i}": event(
                f"e{i}", event_type, at=at, causation_id=None if cause is None else f"e{cause}"
            )
            for i, (at, event_type, cause) in enumerate(radius)
        }

        def priority(event_id: str) -> tuple[datetime, int, str]:
            e = by_id[event_id]
            return (e.occurred_at, REGISTRY.step_rank(e.event_type), event_id)

        assert planner._forward_order(by_id, REGISTRY) == planner._kahn(by_id, priority)

    def test_a_cause_later_in_time_than_its_effect_comes_first(self) -> None:
        # Not the sorted order: the fast path must notice and give way.
        by_id = {
            "child": event("child", "ParcelShipped", at=1, causation_id="parent"),
            "parent": event("parent", "OrderPlaced", at=2),
            "other": event("other", "OrderPlaced", at=0),
        }
        assert planner._forward_order(by_id, REGISTRY) == ["other", "parent", "child"]


class TestSagaInstances:
    def test_within_an_instance_later_events_are_compensated_first(self) -> None:
        events = [
            event("first", "OrderPlaced", at=1, correlation_id="c1"),
            event("third", "ParcelShipped", at=30, correlation_id="c1"),
            event("second", "PaymentCaptured", at=20, correlation_id="c1"),
        ]
        result = plan(events)
        assert order(result) == ["third", "second", "first"]
        items = {item.event.event_id: item for item in result.items}
        # A chain: each waits only on the one right after it.
        assert items["third"].depends_on == ()
        assert items["second"].depends_on == (key_of(result, "third"),)
        assert items["first"].depends_on == (key_of(result, "second"),)

    def test_declared_step_order_breaks_timestamp_ties(self) -> None:
        # Same instant; ids sort the opposite way of the saga's step order, so
        # only the step order can put the shipment first.
        events = [
            event("a-shipped", "ParcelShipped", at=5, correlation_id="c1"),
            event("b-stock", "StockReserved", at=5, correlation_id="c1"),
            event("c-payment", "PaymentCaptured", at=5, correlation_id="c1"),
            event("d-order", "OrderPlaced", at=5, correlation_id="c1"),
        ]
        result = plan(events)
        assert order(result) == ["a-shipped", "b-stock", "c-payment", "d-order"]
        assert [item.step.event_type for item in result.items] == [
            "ParcelShipped",
            "StockReserved",
            "PaymentCaptured",
            "OrderPlaced",
        ]

    def test_time_outranks_step_order(self) -> None:
        # The order was (re)placed after the payment: undo it first.
        events = [
            event("payment", "PaymentCaptured", at=5, correlation_id="c1"),
            event("order", "OrderPlaced", at=6, correlation_id="c1"),
        ]
        assert order(plan(events)) == ["order", "payment"]

    def test_independent_instances_do_not_depend_on_each_other(self) -> None:
        events = [
            event("c1-order", "OrderPlaced", at=1, correlation_id="c1"),
            event("c2-order", "OrderPlaced", at=2, correlation_id="c2"),
            event("c1-pay", "PaymentCaptured", at=3, correlation_id="c1"),
            event("c2-pay", "PaymentCaptured", at=4, correlation_id="c2"),
            event("solo", "ParcelShipped", at=5),
        ]
        result = plan(events)
        c1 = {key_of(result, "c1-order"), key_of(result, "c1-pay")}
        c2 = {key_of(result, "c2-order"), key_of(result, "c2-pay")}
        for item in result.items:
            waits = closure(result)[item.key]
            if item.key in c1:
                assert not waits & c2
            elif item.key in c2:
                assert not waits & c1
            else:
                assert waits == set()
        assert precedes(result, "c1-pay", "c1-order")
        assert precedes(result, "c2-pay", "c2-order")
        # Nothing waits on the instance-less event either.
        assert all(key_of(result, "solo") not in w for w in closure(result).values())

    def test_events_without_correlation_id_are_not_chained(self) -> None:
        result = plan([event("x", "OrderPlaced", at=1), event("y", "OrderPlaced", at=2)])
        assert all(item.depends_on == () for item in result.items)


# ------------------------------------------------------------- pass-through


class TestPassThrough:
    @pytest.mark.parametrize(
        ("middle_type", "middle_version"),
        [
            ("OrderViewed", 1),  # ignored
            ("ReceiptEmailed", 1),  # manual
            ("NobodyKnowsMe", 1),  # uncovered: unknown type
            ("StockReserved", 1),  # uncovered: no upcaster from v1
        ],
        ids=["ignored", "manual", "unknown-type", "missing-upcaster"],
    )
    def test_grandchild_behind_a_non_compensated_child_precedes_the_grandparent(
        self, middle_type: str, middle_version: int
    ) -> None:
        events = [
            event("grandparent", "OrderPlaced", at=1, service="orders"),
            event(
                "child",
                middle_type,
                at=2,
                causation_id="grandparent",
                service="mail",
                version=middle_version,
            ),
            event("grandchild", "ParcelShipped", at=3, causation_id="child", service="shipping"),
        ]
        result = plan(events)
        assert order(result) == ["grandchild", "grandparent"]
        grandparent = result.items[1]
        assert grandparent.depends_on == (key_of(result, "grandchild"),)

    @pytest.mark.parametrize(
        "events",
        [
            pytest.param(
                [
                    event("top", "OrderPlaced", at=1),
                    event("v1", "OrderViewed", at=2, causation_id="top"),
                    event("v2", "ReceiptEmailed", at=3, causation_id="v1"),
                    event("v3", "Unknown", at=4, causation_id="v2"),
                    event("bottom", "PaymentCaptured", at=5, causation_id="v3"),
                ],
                id="a-causation-chain-is-bridged",
            ),
            pytest.param(
                [
                    event("top", "OrderPlaced", at=1, correlation_id="c1"),
                    event("viewed", "OrderViewed", at=2, correlation_id="c1"),
                    event("emailed", "ReceiptEmailed", at=3, correlation_id="c1"),
                    event("bottom", "ParcelShipped", at=4, correlation_id="c1"),
                ],
                id="an-instance-chain-is-not-broken",
            ),
        ],
    )
    def test_pass_through_events_between_two_compensated_ones(
        self, events: list[TrackedEvent]
    ) -> None:
        # Ignored, manual and unknown events in between: "bottom" still goes first.
        result = plan(events)
        assert order(result) == ["bottom", "top"]
        assert result.items[1].depends_on == (key_of(result, "bottom"),)

    def test_counts_of_a_mixed_plan(self) -> None:
        events = [
            event("placed", "OrderPlaced", at=1),
            event("viewed", "OrderViewed", at=2),
            event("viewed-again", "OrderViewed", at=3),
            event("emailed", "ReceiptEmailed", at=4),
            event("mystery", "Mystery", at=5),
        ]
        result = plan(events)
        assert order(result) == ["placed"]
        assert result.ignored == 2
        assert [n.event_id for n in result.manual] == ["emailed"]
        assert [n.event_id for n in result.uncovered] == ["mystery"]
        assert result.events == 5


# ------------------------------------------------------------------ notes


class TestPlanNotes:
    def test_manual_note_carries_the_action_text_and_saga(self) -> None:
        emailed = event("emailed", "ReceiptEmailed", at=7, service="mail")
        result = plan([emailed])
        assert result.items == []
        (note,) = result.manual
        assert note.kind == "manual"
        assert note.detail == "Send a correction e-mail to the customer"
        assert note.saga == "checkout"
        assert (note.event_id, note.event_type, note.service) == (
            "emailed",
            "ReceiptEmailed",
            "mail",
        )
        assert note.as_dict() == {
            "kind": "manual",
            "event_id": "emailed",
            "event_type": "ReceiptEmailed",
            "schema_version": 1,
            "service": "mail",
            "occurred_at": emailed.occurred_at.isoformat(),
            "detail": "Send a correction e-mail to the customer",
            "saga": "checkout",
        }

    def test_unknown_type_is_uncovered_with_a_reason(self) -> None:
        result = plan([event("odd", "LoyaltyPointsGranted")])
        (note,) = result.uncovered
        assert note.kind == "uncovered"
        assert note.event_type == "LoyaltyPointsGranted"
        assert note.detail == "no saga declares LoyaltyPointsGranted"
        assert note.saga is None

    def test_missing_upcaster_is_uncovered_with_a_reason(self) -> None:
        # The saga upcasts StockReserved v2 → v3 only; a v1 payload cannot get there.
        result = plan([event("old", "StockReserved", version=1)])
        assert result.items == []
        (note,) = result.uncovered
        assert note.schema_version == 1
        assert "StockReserved v1 cannot reach v3" in note.detail
        assert "no upcaster from v1" in note.detail

    def test_upcastable_version_is_planned_against_the_handlers_version(self) -> None:
        result = plan([event("older", "StockReserved", version=2)])
        assert result.uncovered == []
        (item,) = result.items
        assert item.step.version == 3
        (row,) = result.new_compensations()
        assert row.target_version == 3

    def test_a_version_newer_than_every_handler_is_uncovered(self) -> None:
        (note,) = plan([event("newer", "StockReserved", version=4)]).uncovered
        assert "up to v3, not v4" in note.detail


# ------------------------------------------------------------ idempotency keys


class TestIdempotencyKeys:
    def test_key_is_a_uuid5_of_event_and_step(self) -> None:
        key = idempotency_key("event-1", "checkout.refund")
        parsed = uuid.UUID(key)
        assert parsed.version == 5
        assert key == str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, "event-1\x1fcheckout.refund"))

    @given(event_id=st.text(max_size=300), step=st.text(max_size=100))
    def test_key_is_exactly_uuid5_for_any_text(self, event_id: str, step: str) -> None:
        # Computed without `uuid.UUID`; keys already stored in ledgers must
        # stay what `uuid.uuid5` made them.
        try:
            expected = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{event_id}\x1f{step}"))
        except UnicodeEncodeError:  # a lone surrogate: neither can encode it
            with pytest.raises(UnicodeEncodeError):
                idempotency_key(event_id, step)
            return
        assert idempotency_key(event_id, step) == expected

    def test_key_is_deterministic(self) -> None:
        assert idempotency_key("event-1", "checkout.refund") == idempotency_key(
            "event-1", "checkout.refund"
        )

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            (("event-1", "checkout.refund"), ("event-2", "checkout.refund")),
            (("event-1", "checkout.refund"), ("event-1", "checkout.cancel_order")),
            # The separator keeps (event, step) pairs from colliding by concatenation.
            (("e", "1.x"), ("e1", ".x")),
        ],
    )
    def test_keys_differ_per_event_and_per_step(
        self, a: tuple[str, str], b: tuple[str, str]
    ) -> None:
        assert idempotency_key(*a) != idempotency_key(*b)

    def test_planning_twice_gives_the_same_keys(self) -> None:
        events = [
            event("order", "OrderPlaced", at=1, correlation_id="c1"),
            event("payment", "PaymentCaptured", at=2, correlation_id="c1", causation_id="order"),
        ]
        first, second = plan(events), plan(list(reversed(events)))
        assert [i.key for i in first.items] == [i.key for i in second.items]
        assert [i.depends_on for i in first.items] == [i.depends_on for i in second.items]
        assert key_of(first, "payment") == idempotency_key("payment", "checkout.refund")

    def test_plan_keys_are_distinct(self) -> None:
        events = [event(f"e{i}", "OrderPlaced", at=i) for i in range(50)]
        keys = [item.key for item in plan(events).items]
        assert len(set(keys)) == 50

    def test_ledger_rows_carry_key_position_dependencies_and_step(self) -> None:
        events = [
            event("order", "OrderPlaced", at=1, correlation_id="c1"),
            event("payment", "PaymentCaptured", at=2, correlation_id="c1"),
        ]
        result = plan_compensations(events, REGISTRY, first_position=10)
        rows = result.new_compensations(late=True)
        assert [r.position for r in rows] == [10, 11]
        payment, placed = rows
        assert payment.idempotency_key == idempotency_key("payment", "checkout.refund")
        assert payment.step == "checkout.refund"
        assert payment.confirm_type == "PaymentRefunded"
        assert payment.correlation_id == "c1"
        assert payment.depends_on == ()
        assert placed.depends_on == (payment.idempotency_key,)
        assert placed.confirm_type is None
        assert all(r.late for r in rows)
