"""The ledger's contract, written once and run against SQLite and PostgreSQL.

`LedgerContract` holds the tests; `TestLedgerContract` runs them through the
parametrized `ledger_url` fixture (tests/conftest.py), which gives a fresh,
empty database of each kind to every test.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from sagas.errors import LedgerError
from sagas.ledger import (
    CompensationRecord,
    CompensationState,
    Counts,
    Ledger,
    NewCompensation,
    Outcome,
    TrackedEvent,
    TrackedOffset,
    rollbacks,
)
from sagas.ledger.rollbacks import ANALYZE_AFTER_PLAN
from tests.support.waiting import wait_for

S = CompensationState
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PLUS_2 = timezone(timedelta(hours=2))
MINUS_5 = timezone(timedelta(hours=-5))
DEPLOY = "orders-2.4.0-7f3a"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def event(
    event_id: str,
    minute: float = 0,
    *,
    deployment: str = DEPLOY,
    event_type: str = "OrderPlaced",
    version: int = 1,
    service: str = "orders",
    service_version: str = "2.4.0",
    causation: str | None = None,
    **extra: Any,
) -> TrackedEvent:
    return TrackedEvent(
        event_id=event_id,
        event_type=event_type,
        schema_version=version,
        service=service,
        service_version=service_version,
        deployment_id=deployment,
        occurred_at=at(minute),
        payload=extra.pop("payload", {"id": event_id}),
        causation_id=causation,
        **extra,
    )


def item(
    key: str,
    position: int = 0,
    *,
    event_id: str | None = None,
    confirm: str | None = None,
    depends_on: Sequence[str] = (),
    late: bool = False,
) -> NewCompensation:
    return NewCompensation(
        idempotency_key=key,
        event_id=event_id or f"evt-{key}",
        saga="checkout",
        step="checkout.cancel_order",
        event_type="OrderPlaced",
        target_version=1,
        correlation_id="checkout-1",
        confirm_type=confirm,
        position=position,
        depends_on=tuple(depends_on),
        late=late,
    )


def as_planned(record: CompensationRecord) -> NewCompensation:
    """A compensation read back, in the form a run takes from `save_plan`'s
    return: the same fields, and pending, never attempted."""
    untouched = (S.PENDING, 0, None, None, None, None)
    assert (
        record.state,
        record.attempts,
        record.last_error,
        record.confirm_deadline,
        record.next_attempt_at,
        record.skip_reason,
    ) == untouched
    return NewCompensation(**{f.name: getattr(record, f.name) for f in fields(NewCompensation)})


async def must_get(ledger: Ledger, event_id: str) -> TrackedEvent:
    found = await ledger.get_event(event_id)
    assert found is not None, event_id
    return found


async def add_rollback(
    ledger: Ledger,
    rollback_id: str,
    *,
    state: str = "accepted",
    now: datetime = T0,
    partition: int | None = 0,
) -> None:
    """A rollback of DEPLOY as a signal creates it, not planned yet."""
    created = await ledger.create_rollback(
        rollback_id,
        signal={"signal_id": rollback_id, "deployment_id": DEPLOY},
        deployment_id=DEPLOY,
        dry_run=False,
        state=state,
        now=now,
        signal_partition=partition,
    )
    assert created


async def new_rollback(
    ledger: Ledger,
    rollback_id: str,
    items: Sequence[NewCompensation],
    *,
    partition: int | None = 0,
    state: str = "running",
    manual: list[dict[str, Any]] | None = None,
    uncovered: list[dict[str, Any]] | None = None,
) -> None:
    await add_rollback(ledger, rollback_id, partition=partition)
    await ledger.save_plan(
        rollback_id, items, manual=manual or [], uncovered=uncovered or [], state=state, now=T0
    )


async def states(ledger: Ledger, *keys: str) -> dict[str, CompensationState]:
    return await ledger.compensation_states(keys)


def assert_utc(value: datetime | None, expected: datetime) -> None:
    assert value is not None
    assert value == expected
    assert value.utcoffset() == timedelta(0)
    # The wall-clock fields are UTC's, not the offset's the value was written with.
    assert value.replace(tzinfo=None) == expected.astimezone(UTC).replace(tzinfo=None)


class LedgerContract:
    """Behaviour every ledger backend must have."""

    @pytest.fixture
    async def ledger(self, ledger_url: str) -> AsyncIterator[Ledger]:
        ledger = await Ledger.open(ledger_url)
        try:
            yield ledger
        finally:
            await ledger.close()

    # ---------------------------------------------------------- migrations

    async def test_migrations_are_idempotent(self, ledger: Ledger) -> None:
        await ledger.track([event("e1")], now=T0)

        again = await Ledger.open(ledger.url)
        try:
            await again.ping()
            assert (await again.get_event("e1")) is not None
            await again.track([event("e2")], now=T0)
            async with again.engine.connect() as conn:
                versions = (
                    await conn.execute(text("SELECT version_num FROM alembic_version"))
                ).all()
        finally:
            await again.close()

        assert len(versions) == 1
        assert await ledger.count_events() == 2

    # ------------------------------------------------------------ tracking

    async def test_track_stores_events_with_every_field(self, ledger: Ledger) -> None:
        stored = event(
            "e1",
            5,
            version=3,
            payload={
                "order_id": "o-1",
                "total": 12.5,
                "lines": [{"sku": "Ä", "qty": 2}],
                "n": None,
            },
            correlation_id="checkout-1",
            key="o-1",
            topic="orders.events",
            partition=2,
            offset=41,
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate="vendor=x",
        )

        result = await ledger.track([stored], now=at(10))

        assert result.new_events == [stored]
        assert result.duplicates == 0
        assert result.confirmed_keys == []
        assert await ledger.get_event("e1") == stored
        assert await ledger.get_event("nope") is None

    async def test_track_stores_text_exactly_whatever_it_escapes(self, ledger: Ledger) -> None:
        # PostgreSQL receives a batch as one JSON document (`recordset_insert`):
        # what JSON escapes must come back as it went in, in columns and payload.
        awkward = 'quote " backslash \\ slash / \n\t\r \u0001 é 漢 🚀 \\u0041 null'
        stored = event(
            f"e-{awkward}",
            version=2,
            service=f"svc {awkward}"[:255],
            deployment=f"dep {awkward}",
            payload={
                awkward: [awkward, {"nested": {"deeper": [1, -0.0, 0.1 + 0.2, 2**62, True]}}],
                "empty": {},
                "list": [],
                "null": None,
                "big": 1e300,
                "beyond 64 bits": -(2**70),
                # Valid JSON escapes that PostgreSQL refuses to decode.
                "lone surrogates": "\ud800 \udfff",
            },
            correlation_id=awkward,
            causation=f"c {awkward}",
            key=awkward,
            topic=f"t {awkward}",
            partition=2**31 - 1,
            offset=2**62,
            tracestate="k=v,k2=v2",
        )
        stored = replace(stored, occurred_at=datetime(2026, 1, 1, 14, 30, 0, 123456, tzinfo=PLUS_2))

        result = await ledger.track([stored], now=at(10))

        assert result.new_events == [stored]
        back = await ledger.get_event(stored.event_id)
        assert back is not None
        assert back.payload == stored.payload
        assert repr(back.payload) == repr(stored.payload)  # -0.0, float digits, key order
        assert back == replace(stored, occurred_at=stored.occurred_at.astimezone(UTC))
        assert back.occurred_at.microsecond == 123456
        assert await ledger.deployment_ids_for(stored.service, stored.service_version) == [
            stored.deployment_id
        ]
        assert [e.event_id for e in await ledger.events_caused_by([f"c {awkward}"])] == [
            stored.event_id
        ]

    async def test_track_stores_a_payload_orjson_encodes_exactly(self, ledger: Ledger) -> None:
        # Without lone surrogates or integers beyond 64 bits, PostgreSQL's
        # documents are written by orjson (UTF-8, no escapes), not `json`.
        awkward = 'quote " backslash \\ \n\t \u0001 é 漢 🚀 \\u0041'
        payload = {
            awkward: [awkward, {"deeper": [1, -0.0, 0.1 + 0.2, 2**63 - 1, -(2**63), False]}],
            "small": 5e-324,
            "big": 1.7976931348623157e308,
            "null": None,
        }
        stored = event("e-orjson", payload=payload)

        await ledger.track([stored], now=at(10))

        back = await ledger.get_event(stored.event_id)
        assert back is not None
        assert repr(back.payload) == repr(payload)  # -0.0, float digits, key order

    async def test_track_ignores_duplicates_within_a_batch(self, ledger: Ledger) -> None:
        first = event("e1", 1)
        twin = event("e1", 99, payload={"changed": True})

        result = await ledger.track([first, twin, event("e2", 2), first], now=T0)

        assert [e.event_id for e in result.new_events] == ["e1", "e2"]
        assert result.duplicates == 2
        assert await ledger.get_event("e1") == first  # the first copy wins
        assert await ledger.count_events() == 2

    async def test_track_ignores_duplicates_across_batches(self, ledger: Ledger) -> None:
        await ledger.track([event("e1", 1), event("e2", 2)], now=T0)

        result = await ledger.track(
            [event("e2", 50, payload={"other": 1}), event("e3", 3)], now=at(60)
        )

        assert [e.event_id for e in result.new_events] == ["e3"]
        assert result.duplicates == 1
        assert (await ledger.get_event("e2")) == event("e2", 2)
        assert await ledger.count_events() == 3

    async def test_offsets_are_stored_and_only_move_forward(self, ledger: Ledger) -> None:
        group, topic = "backout-tracker", "orders.events"

        await ledger.track(
            [event("e1")],
            [
                TrackedOffset(group, topic, 0, 5),
                TrackedOffset(group, topic, 0, 3),
                TrackedOffset(group, topic, 1, 7),
                TrackedOffset("other-group", topic, 0, 100),
            ],
            now=T0,
        )
        assert await ledger.tracked_offsets(group) == {(topic, 0): 5, (topic, 1): 7}

        # A batch of duplicates only still moves offsets; a lower offset never wins.
        await ledger.track(
            [event("e1")],
            [TrackedOffset(group, topic, 0, 4), TrackedOffset(group, topic, 1, 9)],
            now=T0,
        )
        assert await ledger.tracked_offsets(group) == {(topic, 0): 5, (topic, 1): 9}

        # A batch with no valid event at all (every record dead-lettered) too.
        await ledger.track([], [TrackedOffset(group, topic, 0, 12)], now=T0)
        assert await ledger.tracked_offsets(group) == {(topic, 0): 12, (topic, 1): 9}
        assert await ledger.tracked_offsets("other-group") == {(topic, 0): 100}
        assert await ledger.tracked_offsets("unknown") == {}

    async def test_deployment_window_widens_and_ignores_duplicates(self, ledger: Ledger) -> None:
        await ledger.track([event("e1", 10), event("e2", 5)], now=T0)
        [summary] = await ledger.list_deployments()
        assert (summary.first_event_at, summary.last_event_at) == (at(5), at(10))

        await ledger.track([event("e3", 20), event("e4", 2), event("e5", 7)], now=at(30))
        await ledger.track([event("e1", -100), event("e2", 500)], now=at(40))  # duplicates

        [summary] = await ledger.list_deployments()
        assert summary.deployment_id == DEPLOY
        assert (summary.service, summary.service_version) == ("orders", "2.4.0")
        assert (summary.first_event_at, summary.last_event_at) == (at(2), at(20))
        assert summary.events == 5

    async def test_deployment_events_window(self, ledger: Ledger) -> None:
        # Inserted out of order; two events share minute 3.
        await ledger.track(
            [event(f"e{m}", m) for m in (4, 0, 3, 1, 5, 2)]
            + [event("e3b", 3), event("x1", 2, deployment="payments-1.0.0-aa")],
            now=T0,
        )

        def ids(events: Sequence[TrackedEvent]) -> list[str]:
            return [e.event_id for e in events]

        everything = await ledger.deployment_events(DEPLOY)
        assert ids(everything) == ["e0", "e1", "e2", "e3", "e3b", "e4", "e5"]
        window = await ledger.deployment_events(DEPLOY, since=at(1), until=at(3))
        assert ids(window) == ["e1", "e2", "e3", "e3b"]
        assert ids(await ledger.deployment_events(DEPLOY, since=at(4))) == ["e4", "e5"]
        assert ids(await ledger.deployment_events(DEPLOY, until=at(0))) == ["e0"]
        assert ids(await ledger.deployment_events(DEPLOY, since=at(2.5), until=at(2.9))) == []
        assert ids(await ledger.deployment_events("payments-1.0.0-aa")) == ["x1"]
        assert await ledger.deployment_events("unknown") == []

    async def test_deployments_by_service_version(self, ledger: Ledger) -> None:
        await ledger.track(
            [
                event("a", 5, deployment="orders-2.4.0-b"),
                event("b", 1, deployment="orders-2.4.0-a"),
                event("c", 1, deployment="orders-2.5.0-a", service_version="2.5.0"),
            ],
            now=T0,
        )

        assert await ledger.deployment_ids_for("orders", "2.4.0") == [
            "orders-2.4.0-a",
            "orders-2.4.0-b",
        ]
        assert await ledger.deployment_ids_for("orders", "9.9.9") == []

    async def test_list_deployments_counts_by_type_and_version(self, ledger: Ledger) -> None:
        await ledger.track(
            [
                event("o1", 1),
                event("o2", 2),
                event("o3", 3, version=2),
                event("p1", 4, event_type="PaymentCaptured"),
                event(
                    "x1",
                    30,
                    deployment="payments-1.0.0-aa",
                    service="payments",
                    service_version="1.0.0",
                    event_type="PaymentCaptured",
                    version=4,
                ),
            ],
            now=T0,
        )

        newest, older = await ledger.list_deployments()

        assert newest.deployment_id == "payments-1.0.0-aa"  # newest last event first
        assert newest.by_type == {"PaymentCaptured v4": 1}
        assert older.deployment_id == DEPLOY
        assert older.by_type == {"OrderPlaced v1": 2, "OrderPlaced v2": 1, "PaymentCaptured v1": 1}
        assert older.events == 4

    # ------------------------------------------------------------ causation

    async def test_events_caused_by_and_causal_closure_across_services(
        self, ledger: Ledger
    ) -> None:
        await ledger.track(
            [
                event("a", 0),
                event("b", 1, service="payments", deployment="payments-1", causation="a"),
                event("c", 2, service="inventory", deployment="inventory-7", causation="b"),
                event("d", 3, service="shipping", deployment="shipping-3", causation="c"),
                event("b2", 1, service="payments", deployment="payments-1", causation="a"),
                event("unrelated", 1, causation="elsewhere"),
                event("root2", 5),
            ],
            now=T0,
        )

        def ids(events: Sequence[TrackedEvent]) -> set[str]:
            return {e.event_id for e in events}

        assert ids(await ledger.events_caused_by(["a"])) == {"b", "b2"}
        assert ids(await ledger.events_caused_by(["a", "b", "a"])) == {"b", "b2", "c"}
        assert await ledger.events_caused_by([]) == []
        assert await ledger.events_caused_by(["d"]) == []

        a = await ledger.get_event("a")
        root2 = await ledger.get_event("root2")
        assert a is not None
        assert root2 is not None
        closure = await ledger.causal_closure([a, root2])
        assert ids(closure) == {"a", "b", "b2", "c", "d", "root2"}
        assert len(closure) == 6

    async def test_causal_closure_terminates_on_cycles(self, ledger: Ledger) -> None:
        await ledger.track(
            [
                event("x", 0, causation="z"),
                event("y", 1, causation="x"),
                event("z", 2, causation="y"),
                event("self", 3, causation="self"),
            ],
            now=T0,
        )
        x = await ledger.get_event("x")
        loop = await ledger.get_event("self")
        assert x is not None
        assert loop is not None

        assert {e.event_id for e in await ledger.causal_closure([x])} == {"x", "y", "z"}
        assert [e.event_id for e in await ledger.causal_closure([loop])] == ["self"]

    async def test_causal_closure_is_every_descendant_read_whole(self, ledger: Ledger) -> None:
        # A random causation graph with chains, fan-outs, cycles, self-loops
        # and parents never tracked, against a walk of it done here.
        rng = random.Random(8)
        ids = [f"e{i:03d}" for i in range(300)]
        cause = {i: rng.choice([None, None, "untracked", *ids]) for i in ids}
        await ledger.track(
            [
                event(i, n % 7, causation=cause[i], payload={"n": n, "big": 2**70})
                for n, i in enumerate(ids)
            ],
            now=T0,
        )
        roots = rng.sample(ids, 12)
        expected = set(roots)
        frontier = set(roots)
        while frontier:
            frontier = {i for i in ids if cause[i] in frontier} - expected
            expected |= frontier

        closure = await ledger.causal_closure([await must_get(ledger, r) for r in roots])

        assert sorted(e.event_id for e in closure) == sorted(expected)
        assert [e.event_id for e in closure[: len(roots)]] == roots  # the roots first
        for e in closure:
            assert e == await ledger.get_event(e.event_id)
        assert await ledger.causal_closure([]) == []

    async def test_events_caused_by_many_ids(self, ledger: Ledger) -> None:
        parents = [event(f"p{i:04d}", i) for i in range(1200)]
        children = [event(f"c{i:04d}", i, causation=f"p{i:04d}") for i in range(0, 1200, 7)]
        await ledger.track(parents + children, now=T0)

        caused = await ledger.events_caused_by([p.event_id for p in parents])

        assert sorted(e.event_id for e in caused) == sorted(c.event_id for c in children)

    # ------------------------------------------------------------ rollbacks

    async def test_create_rollback_once_per_id(self, ledger: Ledger) -> None:
        signal = {"signal_id": "rb-1", "deployment_id": DEPLOY, "cascade": True, "reason": "5xx ↑"}

        first = await ledger.create_rollback(
            "rb-1",
            signal=signal,
            deployment_id=DEPLOY,
            dry_run=True,
            state="accepted",
            now=T0,
            signal_partition=3,
        )
        second = await ledger.create_rollback(
            "rb-1",
            signal={"other": True},
            deployment_id="other",
            dry_run=False,
            state="rejected",
            now=at(1),
            error="x",
        )

        assert (first, second) == (True, False)
        record = await ledger.require_rollback("rb-1")
        assert record.signal == signal
        assert record.deployment_id == DEPLOY
        assert record.state == "accepted"
        assert record.dry_run is True
        assert record.signal_partition == 3
        assert record.error is None
        assert record.finished_at is None
        assert (record.manual, record.uncovered) == ([], [])
        assert await ledger.get_rollback("rb-2") is None
        with pytest.raises(LedgerError, match="rb-2"):
            await ledger.require_rollback("rb-2")

    async def test_rejected_rollback_is_finished_with_its_error(self, ledger: Ledger) -> None:
        await ledger.create_rollback(
            "rb-bad",
            signal={"signal_id": "rb-bad"},
            deployment_id=None,
            dry_run=False,
            state="rejected",
            now=at(3),
            error="unknown deployment 'nope'",
        )

        record = await ledger.require_rollback("rb-bad")

        assert record.error == "unknown deployment 'nope'"
        assert record.finished_at == at(3)
        assert await ledger.active_rollbacks() == []

    async def test_save_plan_inserts_compensations_and_items(self, ledger: Ledger) -> None:
        manual = [{"kind": "manual", "event_id": "m1", "action": "Call the customer"}]
        uncovered = [{"kind": "uncovered", "event_id": "u1", "reason": "no saga"}]
        await add_rollback(ledger, "rb-1", state="planning")

        stored = await ledger.save_plan(
            "rb-1",
            [
                item("k2", 1, confirm="OrderCancelled", depends_on=["k1", "k0"]),
                item("k1", 0),
                item("k3", 2, late=True),
            ],
            manual=manual,
            uncovered=uncovered,
            state="running",
            now=at(1),
            quarantine_until=at(60),
        )

        plan = await ledger.plan_items("rb-1")
        # Every key was new: the plan as stored, without reading it.
        assert stored == [as_planned(p) for p in plan]
        assert [p.idempotency_key for p in plan] == ["k1", "k2", "k3"]
        assert {p.state for p in plan} == {S.PENDING}
        assert {p.attempts for p in plan} == {0}
        assert plan[1].depends_on == ("k1", "k0")
        assert plan[1].confirm_type == "OrderCancelled"
        assert plan[1].event_id == "evt-k2"
        assert plan[1].position == 1
        assert [p.late for p in plan] == [False, False, True]
        record = await ledger.require_rollback("rb-1")
        assert record.state == "running"
        assert record.manual == manual
        assert record.uncovered == uncovered
        assert record.quarantine_until == at(60)
        assert record.updated_at == at(1)
        assert record.finished_at is None

    async def test_save_plan_stores_text_exactly_whatever_it_escapes(self, ledger: Ledger) -> None:
        # PostgreSQL receives a plan as one JSON document (`recordset_insert`).
        awkward = 'quote " backslash \\ \n 漢 🚀 \\u0041'
        await add_rollback(ledger, "rb-1", state="planning")
        planned = [
            replace(
                item(f"k1 {awkward}", 0, confirm=f"Cancelled {awkward}"),
                saga=f"saga {awkward}",
                step=f"step {awkward}",
                correlation_id=awkward,
                event_id=f"e {awkward}",
            ),
            item("k2", 1, depends_on=[f"k1 {awkward}", awkward]),
        ]

        stored = await ledger.save_plan(
            "rb-1", planned, manual=[], uncovered=[], state="running", now=at(1)
        )

        plan = await ledger.plan_items("rb-1")
        assert stored == [as_planned(p) for p in plan]
        first, second = plan
        assert first.idempotency_key == f"k1 {awkward}"
        assert (first.saga, first.step) == (f"saga {awkward}", f"step {awkward}")
        assert (first.correlation_id, first.event_id) == (awkward, f"e {awkward}")
        assert first.confirm_type == f"Cancelled {awkward}"
        assert second.depends_on == (f"k1 {awkward}", awkward)
        assert [(p.state, p.attempts, p.position) for p in plan] == [
            (S.PENDING, 0, 0),
            (S.PENDING, 0, 1),
        ]

    async def test_a_plan_written_in_parts_counts_what_is_new_across_them(
        self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # PostgreSQL writes a plan as JSON documents of DOCUMENT_ROWS rows each;
        # whether every compensation was new decides if the run may start
        # from the plan as planned, so the count must hold across the parts.
        monkeypatch.setattr(rollbacks, "DOCUMENT_ROWS", 3)
        await add_rollback(ledger, "rb-1", state="planning")
        await add_rollback(ledger, "rb-2", state="planning")
        first = [item(f"k{n}", n) for n in range(8)]

        stored = await ledger.save_plan(
            "rb-1", first, manual=[], uncovered=[], state="running", now=at(1)
        )
        again = await ledger.save_plan(
            "rb-2",
            [item(f"k{n}", n) for n in range(6, 10)],  # k6 and k7 are known already
            manual=[],
            uncovered=[],
            state="running",
            now=at(2),
        )

        assert stored is not None
        assert [c.idempotency_key for c in stored] == [f"k{n}" for n in range(8)]
        assert again is None
        plan = await ledger.plan_items("rb-2")
        assert [(p.idempotency_key, p.position) for p in plan] == [
            (f"k{n}", n) for n in range(6, 10)
        ]

    async def test_a_large_plan_refreshes_postgresql_statistics_only(self, ledger: Ledger) -> None:
        # PostgreSQL plans a rollback's statements by statistics, which a
        # fresh plan makes stale; SQLite's plans are kept as they are (its
        # queries are written for a ledger without statistics).
        await add_rollback(ledger, "rb-big", state="planning")
        size = ANALYZE_AFTER_PLAN
        await ledger.save_plan(
            "rb-big",
            [item(f"k{n:05d}", n) for n in range(size)],
            manual=[],
            uncovered=[],
            state="running",
            now=T0,
        )
        postgresql = ledger.engine.dialect.name == "postgresql"
        # In the background: the plan's run need not wait for it.
        assert ledger.refreshing_statistics == postgresql
        await ledger.statistics_refreshed()
        assert not ledger.refreshing_statistics

        async with ledger.engine.connect() as conn:
            if postgresql:
                estimated = await conn.exec_driver_sql(
                    "SELECT relname, reltuples FROM pg_class"
                    " WHERE relname IN ('compensations', 'rollback_items')"
                )
                assert dict(estimated.all()) == {"compensations": size, "rollback_items": size}
            else:
                stats = await conn.exec_driver_sql(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
                )
                assert stats.scalar() == 0

    async def test_dry_run_plan_is_finished(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-dry", [item("k1")], state="planned")

        record = await ledger.require_rollback("rb-dry")

        assert record.state == "planned"
        assert record.finished_at == T0

    async def test_a_second_rollback_sharing_a_key_does_not_reset_it(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("k1"), item("k2", 1)])
        assert await ledger.claim(["k1"], now=at(1)) == ["k1"]
        await ledger.record_outcomes([Outcome("k1", S.APPLIED)], now=at(2))

        await add_rollback(ledger, "rb-2", state="planning")
        stored = await ledger.save_plan(
            "rb-2", [item("k1", 5), item("k3", 6)], manual=[], uncovered=[], state="running", now=T0
        )

        assert stored is None  # k1 was known: only the ledger knows its state
        plan = {p.idempotency_key: p for p in await ledger.plan_items("rb-2")}
        assert set(plan) == {"k1", "k3"}
        assert plan["k1"].state == S.APPLIED
        assert plan["k1"].attempts == 1
        assert plan["k1"].position == 5  # positions are per rollback
        assert plan["k3"].state == S.PENDING
        assert sorted(await ledger.rollbacks_of("k1")) == ["rb-1", "rb-2"]
        assert await ledger.rollbacks_of("k3") == ["rb-2"]
        assert await ledger.claim(["k1"], now=at(3)) == []  # done work is never redone

    async def test_a_new_plan_gives_a_failed_compensation_a_fresh_budget(
        self, ledger: Ledger
    ) -> None:
        await new_rollback(ledger, "rb-1", [item("failed"), item("applied", 1)])
        await ledger.claim(["failed", "applied"], now=at(1))
        await ledger.record_outcomes(
            [Outcome("failed", S.FAILED, error="boom"), Outcome("applied", S.APPLIED)], now=at(2)
        )

        await add_rollback(ledger, "rb-2", state="planning")
        await ledger.save_plan(
            "rb-2",
            [item("failed"), item("applied", 1), item("new", 2)],
            manual=[],
            uncovered=[],
            state="running",
            now=at(3),
        )

        plan = await ledger.plan_items("rb-2")
        assert [(p.idempotency_key, p.state, p.attempts) for p in plan] == [
            ("failed", S.PENDING, 0),
            ("applied", S.APPLIED, 1),
            ("new", S.PENDING, 0),
        ]

    async def test_saving_the_same_plan_twice_is_harmless(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("k1"), item("k2", 1)])
        await ledger.claim(["k1"], now=at(1))

        # A worker that crashed after saving resumes and saves again.
        await ledger.save_plan(
            "rb-1", [item("k1"), item("k2", 1)], manual=[], uncovered=[], state="running", now=at(2)
        )

        plan = await ledger.plan_items("rb-1")
        assert [(p.idempotency_key, p.state, p.attempts) for p in plan] == [
            ("k1", S.RUNNING, 1),
            ("k2", S.PENDING, 0),
        ]

    async def test_add_items_and_manual_entries_late(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("k1")], manual=[{"kind": "manual", "n": 1}])

        await ledger.add_items("rb-1", [item("k9", 9, late=True)], now=at(5))
        await ledger.add_manual(
            "rb-1",
            [{"kind": "manual", "n": 2}, {"kind": "uncovered", "n": 3}],
            now=at(5),
        )

        plan = await ledger.plan_items("rb-1")
        assert [(p.idempotency_key, p.late) for p in plan] == [("k1", False), ("k9", True)]
        record = await ledger.require_rollback("rb-1")
        assert record.manual == [{"kind": "manual", "n": 1}, {"kind": "manual", "n": 2}]
        assert record.uncovered == [{"kind": "uncovered", "n": 3}]

    # ------------------------------------------------------ state machine

    async def test_claim_runs_each_pending_key_once(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("k1"), item("k2", 1), item("k3", 2)])

        first = await ledger.claim(["k1", "k2", "unknown"], now=at(1))
        second = await ledger.claim(["k1", "k2", "k3"], now=at(2))

        assert sorted(first) == ["k1", "k2"]
        assert second == ["k3"]
        assert await ledger.claim(["k1", "k2", "k3"], now=at(3)) == []
        k1 = await ledger.get_compensation("k1")
        assert k1 is not None
        assert (k1.state, k1.attempts) == (S.RUNNING, 1)

    async def test_a_claim_writes_the_outcomes_given_with_it_first(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("child"), item("other", 1), item("parent", 2)])
        await ledger.claim(["child", "other"], now=at(1))

        claimed = await ledger.claim(
            ["parent", "child"],
            now=at(2),
            rollback_id="rb-1",
            outcomes=[
                Outcome("child", S.APPLIED, confirm_deadline=at(9)),
                Outcome("other", S.PENDING, error="timeout", next_attempt_at=at(3)),
            ],
        )

        # The outcomes landed before the claim: the child is applied, so the
        # claim leaves it out; the retried one is pending again, unclaimed.
        assert claimed == ["parent"]
        assert await states(ledger, "child", "other", "parent") == {
            "child": S.APPLIED,
            "other": S.PENDING,
            "parent": S.RUNNING,
        }
        child = await ledger.get_compensation("child")
        assert child is not None
        assert (child.confirm_deadline, child.attempts) == (at(9), 1)

    async def test_a_claim_that_fails_writes_none_of_its_outcomes(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("child"), item("parent", 1)])
        await ledger.claim(["child"], now=at(1))

        # A key of the wrong type makes the claim's statement fail after the
        # outcome's UPDATE has run, in the same transaction.
        with pytest.raises(DBAPIError, match=r"parameter|argument"):
            await ledger.claim(
                ["parent", object()],  # type: ignore[list-item]
                now=at(2),
                outcomes=[Outcome("child", S.APPLIED)],
            )

        assert await states(ledger, "child", "parent") == {
            "child": S.RUNNING,
            "parent": S.PENDING,
        }

    async def test_retry_later_and_claim_again_counts_attempts(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("k1")])
        await ledger.claim(["k1"], now=at(1))

        await ledger.record_outcomes(
            [Outcome("k1", S.PENDING, error="timeout", next_attempt_at=at(2))], now=at(1)
        )
        pending = await ledger.get_compensation("k1")
        assert pending is not None
        assert (pending.state, pending.last_error, pending.next_attempt_at) == (
            S.PENDING,
            "timeout",
            at(2),
        )

        assert await ledger.claim(["k1"], now=at(2)) == ["k1"]
        running = await ledger.get_compensation("k1")
        assert running is not None
        assert running.attempts == 2

    async def test_outcomes_only_land_on_running_rows(self, ledger: Ledger) -> None:
        await new_rollback(
            ledger,
            "rb-1",
            [item("pending"), item("ok", 1, confirm="OrderCancelled"), item("bad", 2)],
        )
        await ledger.claim(["ok", "bad"], now=at(1))

        await ledger.record_outcomes(
            [
                Outcome("pending", S.APPLIED),
                Outcome("ok", S.APPLIED, confirm_deadline=at(10)),
                Outcome("bad", S.FAILED, error="PermanentError: order o-1 is gone"),
            ],
            now=at(2),
        )
        # A stale second result for the same keys changes nothing.
        await ledger.record_outcomes(
            [Outcome("ok", S.FAILED, error="late"), Outcome("bad", S.APPLIED)], now=at(3)
        )

        assert await states(ledger, "pending", "ok", "bad") == {
            "pending": S.PENDING,
            "ok": S.APPLIED,
            "bad": S.FAILED,
        }
        ok = await ledger.get_compensation("ok")
        bad = await ledger.get_compensation("bad")
        assert ok is not None
        assert bad is not None
        assert ok.confirm_deadline == at(10)
        assert ok.last_error is None
        assert bad.last_error == "PermanentError: order o-1 is gone"
        await ledger.record_outcomes([], now=at(4))  # nothing to write is fine

    async def test_a_batch_of_equal_outcomes_writes_each_running_row(self, ledger: Ledger) -> None:
        # Twenty applied outcomes sharing their values are written as one
        # grouped UPDATE, beside outcomes of their own: every running row
        # gets exactly its own outcome, and rows no longer running none.
        keys = [f"k{n:02d}" for n in range(20)]
        await new_rollback(
            ledger,
            "rb-1",
            [item(k, n, confirm="OrderCancelled") for n, k in enumerate(keys)]
            + [item("retry", 20), item("gone", 21), item("idle", 22)],
        )
        await ledger.claim([*keys, "retry", "gone"], now=at(1))
        await ledger.track(  # k00 confirmed before its handler's result is written
            [event("conf-0", 1, event_type="OrderCancelled", service="orders", causation="k00")],
            now=at(1),
        )

        await ledger.record_outcomes(
            [Outcome(k, S.APPLIED, confirm_deadline=at(10), traceparent=None) for k in keys]
            + [
                Outcome("retry", S.PENDING, error="timeout", next_attempt_at=at(3)),
                Outcome("gone", S.FAILED, error="permanent error: gone"),
                Outcome("idle", S.APPLIED, confirm_deadline=at(10)),
            ],
            now=at(2),
        )

        records = {
            r.idempotency_key: r
            for r in await ledger.get_compensations([*keys, "retry", "gone", "idle"])
        }
        assert records["k00"].state == S.CONFIRMED
        for key in keys[1:]:
            assert records[key].state == S.APPLIED
            assert records[key].confirm_deadline == at(10)
            assert records[key].last_error is None
        retry, gone, idle = records["retry"], records["gone"], records["idle"]
        assert (retry.state, retry.last_error, retry.next_attempt_at) == (
            S.PENDING,
            "timeout",
            at(3),
        )
        assert (gone.state, gone.last_error) == (S.FAILED, "permanent error: gone")
        assert idle.state == S.PENDING  # never claimed: the outcome does not land
        async with ledger.engine.connect() as conn:
            rows = await conn.execute(text("SELECT idempotency_key, applied_at FROM compensations"))
            applied_at = dict(rows.all())
        assert {k for k, when in applied_at.items() if when is not None} == set(keys[1:])

    async def test_confirmation_that_arrives_first_wins(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("k1", confirm="PaymentRefunded")])
        await ledger.claim(["k1"], now=at(1))

        # The service confirmed before the handler's own result was written.
        result = await ledger.track(
            [event("conf-1", 2, event_type="PaymentRefunded", service="payments", causation="k1")],
            now=at(2),
        )
        await ledger.record_outcomes([Outcome("k1", S.APPLIED)], now=at(3))

        assert result.confirmed_keys == ["k1"]
        assert await states(ledger, "k1") == {"k1": S.CONFIRMED}

    async def test_tracking_the_confirm_type_confirms(self, ledger: Ledger) -> None:
        await new_rollback(
            ledger,
            "rb-1",
            [
                item("k1", confirm="PaymentRefunded"),
                item("k2", 1, confirm="PaymentRefunded"),
                item("k3", 2),  # no confirmation declared
                item("k4", 3, confirm="PaymentRefunded"),
            ],
        )
        await ledger.claim(["k1", "k2", "k3"], now=at(1))
        await ledger.record_outcomes(
            [Outcome("k1", S.APPLIED), Outcome("k2", S.APPLIED), Outcome("k3", S.APPLIED)],
            now=at(2),
        )
        await ledger.skip_compensation("k4", reason="operator", now=at(2))

        result = await ledger.track(
            [
                event("c1", 3, event_type="PaymentRefunded", causation="k1"),
                event("c2", 3, event_type="PaymentFailed", causation="k2"),
                event("c3", 3, event_type="PaymentRefunded", causation="k3"),
                event("c4", 3, event_type="PaymentRefunded", causation="k4"),
                event("c5", 3, event_type="PaymentRefunded", causation="not-a-key"),
            ],
            now=at(3),
        )

        assert result.confirmed_keys == ["k1"]
        assert len(result.new_events) == 5  # confirmations are tracked events too
        assert await states(ledger, "k1", "k2", "k3", "k4") == {
            "k1": S.CONFIRMED,
            "k2": S.APPLIED,
            "k3": S.APPLIED,
            "k4": S.SKIPPED,
        }
        # The same confirmation delivered again confirms nothing new.
        again = await ledger.track(
            [event("c1", 3, event_type="PaymentRefunded", causation="k1")], now=at(4)
        )
        assert again.confirmed_keys == []
        assert again.duplicates == 1

    async def test_retry_transitions(self, ledger: Ledger) -> None:
        keys = ["failed", "blocked", "pending", "running", "applied"]
        await new_rollback(ledger, "rb-1", [item(k, i) for i, k in enumerate(keys)])
        await ledger.set_states(["blocked"], S.BLOCKED, now=at(1), only_from=[S.PENDING])
        await ledger.claim(["failed", "running", "applied"], now=at(1))
        await ledger.record_outcomes(
            [
                Outcome("failed", S.FAILED, error="boom", next_attempt_at=at(9)),
                Outcome("applied", S.APPLIED),
            ],
            now=at(2),
        )

        await ledger.retry_compensation("failed", now=at(3))
        await ledger.retry_compensation("blocked", now=at(3))

        retried = await ledger.get_compensation("failed")
        assert retried is not None
        assert (retried.state, retried.attempts, retried.next_attempt_at) == (S.PENDING, 0, None)
        assert await states(ledger, "blocked") == {"blocked": S.PENDING}
        for key, state in (("pending", "pending"), ("running", "running"), ("applied", "applied")):
            with pytest.raises(LedgerError) as caught:
                await ledger.retry_compensation(key, now=at(4))
            assert repr(key) in str(caught.value)
            assert f"it is {state}" in str(caught.value)
        with pytest.raises(LedgerError, match="unknown compensation 'ghost'"):
            await ledger.retry_compensation("ghost", now=at(4))

    async def test_skip_transitions(self, ledger: Ledger) -> None:
        keys = ["failed", "blocked", "pending", "running", "applied", "confirmed"]
        await new_rollback(
            ledger,
            "rb-1",
            [item(k, i, confirm="C" if k == "confirmed" else None) for i, k in enumerate(keys)],
        )
        await ledger.set_states(["blocked"], S.BLOCKED, now=at(1), only_from=[S.PENDING])
        await ledger.claim(["failed", "running", "applied", "confirmed"], now=at(1))
        await ledger.record_outcomes(
            [Outcome("failed", S.FAILED), Outcome("applied", S.APPLIED)], now=at(2)
        )
        await ledger.track([event("conf", 2, event_type="C", causation="confirmed")], now=at(2))

        for key in ("failed", "blocked", "pending"):
            await ledger.skip_compensation(key, reason=f"operator skipped {key}", now=at(3))

        skipped = await ledger.get_compensation("failed")
        assert skipped is not None
        assert (skipped.state, skipped.skip_reason) == (S.SKIPPED, "operator skipped failed")
        assert await states(ledger, "blocked", "pending") == {
            "blocked": S.SKIPPED,
            "pending": S.SKIPPED,
        }
        for key in ("running", "applied", "confirmed", "failed"):  # skipped is final too
            with pytest.raises(LedgerError) as caught:
                await ledger.skip_compensation(key, reason="no", now=at(4))
            assert repr(key) in str(caught.value)
        with pytest.raises(LedgerError, match="unknown compensation 'ghost'"):
            await ledger.skip_compensation("ghost", reason="no", now=at(4))

    async def test_set_states_only_from_given_states(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("a"), item("b", 1)])
        await ledger.claim(["b"], now=at(1))

        moved = await ledger.set_states(
            ["a", "b"], S.BLOCKED, now=at(2), only_from=[S.PENDING], reason="ignored"
        )
        back = await ledger.set_states(["a"], S.PENDING, now=at(3), only_from=[S.BLOCKED])

        assert moved == ["a"]
        assert back == ["a"]
        assert await states(ledger, "a", "b") == {"a": S.PENDING, "b": S.RUNNING}

    async def test_changed_states_reports_what_changed_elsewhere(self, ledger: Ledger) -> None:
        keys = ["confirmed", "own", "skipped", "retried", "shared"]
        await new_rollback(ledger, "rb-1", [item(k, i, confirm="C") for i, k in enumerate(keys)])
        await new_rollback(ledger, "rb-2", [item("shared"), item("other-plan", 1)])
        await ledger.claim(["confirmed", "own", "retried"], now=at(1), rollback_id="rb-1")
        await ledger.record_outcomes(
            [
                Outcome("confirmed", S.APPLIED),
                Outcome("own", S.APPLIED),
                Outcome("retried", S.FAILED, error="boom"),
            ],
            now=at(2),
        )

        await ledger.track([event("conf", 3, event_type="C", causation="confirmed")], now=at(3))
        await ledger.skip_compensation("skipped", reason="operator", now=at(3))
        await ledger.retry_compensation("retried", now=at(3))
        await ledger.claim(["shared", "other-plan"], now=at(3), rollback_id="rb-2")

        changed = dict(await ledger.changed_states("rb-1", since=at(2.5)))
        # Not "shared": a claim is a run's own write, which marks nothing
        # changed (rb-1 learns of it when its own claim finds it taken), nor
        # "own", whose outcome rb-1 wrote itself.
        assert changed == {
            "confirmed": S.CONFIRMED,
            "skipped": S.SKIPPED,
            "retried": S.PENDING,
        }
        assert await ledger.changed_states("rb-1", since=at(4)) == []

    async def test_a_poll_leaves_out_confirmations_its_engine_was_told_of(
        self, ledger: Ledger
    ) -> None:
        keys = ["mine", "theirs", "untagged", "skipped"]
        await new_rollback(ledger, "rb-1", [item(k, i, confirm="C") for i, k in enumerate(keys)])
        await ledger.claim(keys[:3], now=at(1), rollback_id="rb-1")
        await ledger.record_outcomes([Outcome(k, S.APPLIED) for k in keys[:3]], now=at(1))

        mine = [event("c-mine", 2, event_type="C", causation="mine")]
        told = await ledger.track(mine, now=at(2), confirmed_by="engine-a")
        await ledger.track(
            [event("c-theirs", 2, event_type="C", causation="theirs")],
            now=at(2),
            confirmed_by="engine-b",
        )
        await ledger.track(
            [event("c-untagged", 2, event_type="C", causation="untagged")], now=at(2)
        )
        await ledger.skip_compensation("skipped", reason="operator", now=at(2))

        assert told.confirmed_keys == ["mine"]
        assert (await ledger.get_compensation("mine")).state == S.CONFIRMED  # type: ignore[union-attr]
        assert dict(await ledger.changed_states("rb-1", since=at(1.5), known_to="engine-a")) == {
            "theirs": S.CONFIRMED,
            "untagged": S.CONFIRMED,
            "skipped": S.SKIPPED,
        }
        everything = dict(await ledger.changed_states("rb-1", since=at(1.5)))
        assert set(everything) == set(keys)

    async def test_a_confirmation_is_told_again_to_the_engine_that_recorded_it(
        self, ledger: Ledger
    ) -> None:
        # The tracker retries a batch whose first write it saw fail; the
        # write may have committed (connection lost at COMMIT). The events
        # are duplicates now, yet the confirmations must reach the engine
        # again: its runs' polls leave out what it recorded.
        await new_rollback(ledger, "rb-1", [item("a", confirm="C"), item("b", 1, confirm="C")])
        await ledger.claim(["a", "b"], now=at(1), rollback_id="rb-1")
        await ledger.record_outcomes([Outcome("a", S.APPLIED), Outcome("b", S.APPLIED)], now=at(1))
        batch = [
            event("c-a", 2, event_type="C", causation="a"),
            event("c-b", 2, event_type="C", causation="b"),
        ]
        await ledger.track(batch[:1], now=at(2), confirmed_by="engine-a")
        await ledger.track(batch[1:], now=at(2), confirmed_by="engine-b")

        again = await ledger.track(batch, now=at(3), confirmed_by="engine-a", retrying=True)
        elsewhere = await ledger.track(batch, now=at(3), confirmed_by="engine-c", retrying=True)
        duplicate = await ledger.track(batch, now=at(3), confirmed_by="engine-a")

        assert again.new_events == []
        assert again.confirmed_keys == ["a"]
        assert elsewhere.confirmed_keys == []
        # Not retrying: a re-delivered confirmation is a duplicate, nothing more.
        assert duplicate.confirmed_keys == []

    async def test_expire_confirmations_only_touches_applied(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [item("a", confirm="C"), item("b", 1, confirm="C")])
        await ledger.claim(["a", "b"], now=at(1))
        await ledger.record_outcomes([Outcome("a", S.APPLIED, confirm_deadline=at(2))], now=at(1))

        changed = await ledger.expire_confirmations(
            ["a", "b"], now=at(3), next_state=S.PENDING, error="no confirmation in 60s"
        )

        assert changed == ["a"]
        a = await ledger.get_compensation("a")
        assert a is not None
        assert (a.state, a.last_error, a.next_attempt_at) == (
            S.PENDING,
            "no confirmation in 60s",
            at(3),
        )

    # --------------------------------------------------------------- counts

    async def test_counts(self, ledger: Ledger) -> None:
        keys = ["confirmed", "applied", "failed", "skipped", "pending", "running", "blocked"]
        await new_rollback(
            ledger,
            "rb-1",
            [item(k, i, confirm="C" if k == "confirmed" else None) for i, k in enumerate(keys)],
            manual=[{"kind": "manual", "n": 1}, {"kind": "manual", "n": 2}],
            uncovered=[{"kind": "uncovered", "n": 3}],
        )
        await ledger.add_items("rb-1", [item("late-1", 10, late=True)], now=at(1))
        await ledger.set_states(["blocked"], S.BLOCKED, now=at(1), only_from=[S.PENDING])
        await ledger.skip_compensation("skipped", reason="r", now=at(1))
        await ledger.claim(["confirmed", "applied", "failed", "running", "late-1"], now=at(1))
        await ledger.record_outcomes(
            [
                Outcome("confirmed", S.APPLIED),
                Outcome("applied", S.APPLIED),
                Outcome("failed", S.FAILED),
                Outcome("late-1", S.APPLIED),
            ],
            now=at(2),
        )
        await ledger.track([event("c", 3, event_type="C", causation="confirmed")], now=at(3))
        # Another rollback sharing one key: counted in both, nothing else mixes.
        await new_rollback(ledger, "rb-2", [item("confirmed"), item("other", 1)], partition=1)

        assert await ledger.counts("rb-1") == Counts(
            planned=8,
            applied=3,  # applied includes confirmed
            confirmed=1,
            failed=1,
            skipped=1,
            manual=2,
            uncovered=1,
            late=1,
            pending=1,
            running=1,
            blocked=1,
        )
        assert await ledger.counts("rb-2") == Counts(planned=2, applied=1, confirmed=1, pending=1)
        assert await ledger.counts("unknown") == Counts()

    # ------------------------------------------------------- rollback states

    async def test_active_rollbacks_by_partition(self, ledger: Ledger) -> None:
        layout = [
            ("r1", "running", 0),
            ("r2", "accepted", 1),
            ("r3", "completed", 0),
            ("r4", "paused", 2),
            ("r5", "planning", None),
            ("r6", "failed", 1),
            ("r7", "planned", 2),
        ]
        for minute, (rollback_id, state, partition) in enumerate(layout):
            await add_rollback(
                ledger, rollback_id, state=state, now=at(minute), partition=partition
            )

        async def active(partitions: list[int] | None = None) -> list[str]:
            return [r.rollback_id for r in await ledger.active_rollbacks(partitions)]

        assert await active() == ["r1", "r2", "r4", "r5"]
        assert await active([0]) == ["r1"]
        assert await active([2, 1, 2]) == ["r2", "r4"]
        assert await active([]) == []
        assert await active([7]) == []

    async def test_set_rollback_state_guard(self, ledger: Ledger) -> None:
        await new_rollback(ledger, "rb-1", [])

        paused = await ledger.set_rollback_state("rb-1", "paused", now=at(1), only_from=["running"])
        refused = await ledger.set_rollback_state(
            "rb-1", "running", now=at(2), only_from=["completed"]
        )
        done = await ledger.set_rollback_state(
            "rb-1", "failed", now=at(3), error="k1 exhausted", finished=True
        )

        assert (paused, refused, done) == (True, False, True)
        record = await ledger.require_rollback("rb-1")
        assert (record.state, record.error, record.finished_at) == ("failed", "k1 exhausted", at(3))
        assert not await ledger.set_rollback_state("ghost", "failed", now=at(4))

    # ---------------------------------------------------------------- times

    async def test_times_come_back_utc_aware_whatever_offset_went_in(self, ledger: Ledger) -> None:
        happened = datetime(2026, 1, 1, 14, 30, tzinfo=PLUS_2)  # 12:30Z
        tracked = datetime(2026, 1, 1, 8, 0, tzinfo=MINUS_5)  # 13:00Z
        await ledger.track(
            [replace(event("e1"), occurred_at=happened), event("e2", 12 * 60 + 45)], now=tracked
        )
        await add_rollback(ledger, "rb-1", now=tracked)
        await ledger.save_plan(
            "rb-1",
            [item("k1")],
            manual=[],
            uncovered=[],
            state="running",
            now=tracked,
            quarantine_until=datetime(2026, 1, 2, 1, 0, tzinfo=PLUS_2),
        )
        await ledger.claim(["k1"], now=tracked)
        await ledger.record_outcomes(
            [Outcome("k1", S.PENDING, next_attempt_at=datetime(2026, 1, 1, 9, 0, tzinfo=MINUS_5))],
            now=tracked,
        )

        stored = await ledger.get_event("e1")
        assert stored is not None
        assert_utc(stored.occurred_at, datetime(2026, 1, 1, 12, 30, tzinfo=UTC))
        record = await ledger.require_rollback("rb-1")
        assert_utc(record.created_at, datetime(2026, 1, 1, 13, 0, tzinfo=UTC))
        assert_utc(record.quarantine_until, datetime(2026, 1, 1, 23, 0, tzinfo=UTC))
        k1 = await ledger.get_compensation("k1")
        assert k1 is not None
        assert_utc(k1.next_attempt_at, datetime(2026, 1, 1, 14, 0, tzinfo=UTC))
        [summary] = await ledger.list_deployments()
        assert_utc(summary.first_event_at, datetime(2026, 1, 1, 12, 30, tzinfo=UTC))
        assert_utc(summary.last_event_at, datetime(2026, 1, 1, 12, 45, tzinfo=UTC))

        # Window bounds are instants too, whatever their offset: 12:40Z..12:50Z.
        window = await ledger.deployment_events(
            DEPLOY,
            since=datetime(2026, 1, 1, 7, 40, tzinfo=MINUS_5),
            until=datetime(2026, 1, 1, 14, 50, tzinfo=PLUS_2),
        )
        assert [e.event_id for e in window] == ["e2"]
        # Quarantine compares instants: open at 22:59Z, closed at 23:00Z.
        assert [r.rollback_id for r in await ledger.quarantining_rollbacks(at(22 * 60 + 59))] == [
            "rb-1"
        ]
        assert await ledger.quarantining_rollbacks(datetime(2026, 1, 2, 1, 0, tzinfo=PLUS_2)) == []

    # ----------------------------------------------------------------- bulk

    async def test_five_thousand_event_batch_round_trip(self, ledger: Ledger) -> None:
        deployments = ["orders-a", "payments-b", "inventory-c"]
        batch = [
            event(
                f"bulk-{i:05d}",
                i / 10,
                deployment=deployments[i % 3],
                causation=f"bulk-{i - 1:05d}" if i % 10 else None,
                payload={"i": i, "blob": "x" * 50},
                topic="bulk.events",
                partition=i % 4,
                offset=i // 4,
            )
            for i in range(5000)
        ]
        offsets = [TrackedOffset("g", "bulk.events", i % 4, i // 4 + 1) for i in range(5000)]

        result = await ledger.track(batch, offsets, now=T0)

        assert len(result.new_events) == 5000
        assert result.duplicates == 0
        assert await ledger.count_events() == 5000
        assert await ledger.tracked_offsets("g") == {("bulk.events", p): 1250 for p in range(4)}
        stored = await ledger.events_by_id(e.event_id for e in batch)
        assert len(stored) == 5000
        assert stored["bulk-04321"] == batch[4321]
        counts = {d.deployment_id: d.events for d in await ledger.list_deployments()}
        assert counts == {"orders-a": 1667, "payments-b": 1667, "inventory-c": 1666}
        assert len(await ledger.deployment_events("payments-b")) == 1667
        first = await ledger.get_event("bulk-00000")
        assert first is not None
        assert len(await ledger.causal_closure([first])) == 10

        again = await ledger.track(batch, now=at(1))
        assert again.new_events == []
        assert again.duplicates == 5000

        keys = [f"k{i:05d}" for i in range(1200)]
        await new_rollback(ledger, "rb-bulk", [item(k, i) for i, k in enumerate(keys)])
        assert sorted(await ledger.claim(keys, now=at(2))) == keys
        await ledger.record_outcomes([Outcome(k, S.APPLIED) for k in keys], now=at(3))
        assert (await ledger.counts("rb-bulk")).applied == 1200


class TestLedgerContract(LedgerContract):
    """The contract on SQLite and on PostgreSQL (`ledger_url` is parametrized)."""


@pytest.mark.postgres
async def test_claims_and_outcomes_update_rows_in_place_on_postgresql(fresh_pg_url: str) -> None:
    """A run's own writes change no indexed column: PostgreSQL keeps the new
    row version on its page (a HOT update) instead of indexing it again."""
    ledger = await Ledger.open(fresh_pg_url)
    keys = [f"k{i:03d}" for i in range(300)]
    try:
        await new_rollback(ledger, "rb-1", [item(k, i) for i, k in enumerate(keys)])
        assert sorted(await ledger.claim(keys, now=at(1), rollback_id="rb-1")) == keys
        await ledger.record_outcomes([Outcome(k, S.APPLIED) for k in keys], now=at(2))
    finally:
        await ledger.close()  # its connections end, flushing their statistics
    probe = await Ledger.open(fresh_pg_url, migrate_schema=False)
    try:

        async def updates() -> tuple[int, int]:
            async with probe.engine.connect() as conn:
                row = (
                    await conn.execute(
                        text(
                            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                            "WHERE relname = 'compensations'"
                        )
                    )
                ).one()
            return int(row[0]), int(row[1])

        async def flushed() -> bool:
            return (await updates())[0] >= 600

        await wait_for(flushed, timeout=30, message="600 updates in the statistics")
        total, in_place = await updates()
        # Not all: a page full of versions older transactions may still see
        # takes the next one elsewhere. With `state` and `updated_at`
        # indexed, none was (n_tup_hot_upd 0).
        assert in_place >= total // 2, (total, in_place)
    finally:
        await probe.close()
