"""Driving and observing a `Stack` in the e2e tests: produce, wait, read status, check commands."""

from __future__ import annotations

from typing import Any

from tests.e2e.shop import Checkout, checkout, expected_commands, type_counts
from tests.e2e.stack import Stack
from tests.support.kafka import Producer, Record, read_topic
from tests.support.names import unique_name
from tests.support.waiting import wait_for

TERMINAL = {"planned", "completed", "completed_with_warnings", "failed", "rejected"}


def deployments() -> tuple[str, str, str]:
    """Fresh deployment ids of orders, payments and stock."""
    return (
        unique_name("orders", "-1.1"),
        unique_name("payments", "-3.0"),
        unique_name("stock", "-2.2"),
    )


def fresh_checkouts(count: int, **options: Any) -> tuple[str, list[Checkout]]:
    """`count` checkouts of fresh deployments: (the orders deployment, the checkouts).

    `options` go to every `checkout` (e.g. `reserve=False`).
    """
    orders, payments, stock = deployments()
    checkouts = [
        checkout(unique_name("o"), orders=orders, payments=payments, stock=stock, **options)
        for _ in range(count)
    ]
    return orders, checkouts


async def publish(stack: Stack, checkouts: list[Checkout]) -> None:
    """Produce every event of `checkouts` to its service's topic, in causal order."""
    async with Producer(stack.bootstrap) as producer:
        for item in checkouts:
            for service, document in item.events:
                await producer.event(stack.events_topic(service), document)


async def wait_tracked(stack: Stack, deployment: str, by_type: dict[str, int]) -> None:
    """Wait until GET /api/deployments shows `deployment` with exactly `by_type`."""

    async def tracked() -> bool:
        for summary in await stack.worker.get("/api/deployments"):
            if summary["deployment_id"] == deployment:
                return bool(summary["by_type"] == by_type)
        return False

    await wait_for(tracked, timeout=20, interval=0.1, message=f"{deployment} tracked as {by_type}")


async def publish_tracked(stack: Stack, checkouts: list[Checkout], deployment: str) -> None:
    """Publish `checkouts`, then wait until every event of `deployment` in them is tracked."""
    await publish(stack, checkouts)
    await wait_tracked(stack, deployment, type_counts(checkouts, deployment))


async def detail(stack: Stack, rollback_id: str) -> dict[str, Any]:
    """GET /api/rollbacks/{id}."""
    body: dict[str, Any] = await stack.worker.get(f"/api/rollbacks/{rollback_id}")
    return body


async def wait_state(
    stack: Stack, rollback_id: str, states: set[str], timeout: float = 30, **counts: int
) -> dict[str, Any]:
    """Wait until the API shows the rollback in one of `states` (with `counts`)."""

    async def reached() -> dict[str, Any] | None:
        status, body = await stack.worker.fetch(f"/api/rollbacks/{rollback_id}")
        if status != 200 or body["state"] not in states:
            return None
        if any(body[name] != value for name, value in counts.items()):
            return None
        return body

    return await wait_for(
        reached, timeout=timeout, interval=0.1, message=f"rollback {rollback_id} {states} {counts}"
    )


async def final_status(stack: Stack, rollback_id: str, timeout: float = 30) -> dict[str, Any]:
    """The first end-state record of a rollback on `<prefix>status`."""
    records = await read_topic(
        stack.bootstrap,
        stack.status_topic,
        lambda r: r.json()["rollback_id"] == rollback_id and r.json()["state"] in TERMINAL,
        timeout=timeout,
        what=f"final status of {rollback_id}",
    )
    status: dict[str, Any] = records[0].json()
    return status


async def statuses_of(stack: Stack, rollback_id: str, until_state: str) -> list[dict[str, Any]]:
    """The status records of a rollback, in order, up to its first one in `until_state`.

    A rollback's records share a partition (key = rollback id), so topic order
    is publication order.
    """
    seen: list[dict[str, Any]] = []

    def mine(record: Record) -> bool:
        document = record.json()
        if document["rollback_id"] != rollback_id:
            return False
        seen.append(document)
        return bool(document["state"] == until_state)

    await read_topic(stack.bootstrap, stack.status_topic, mine, what=f"{until_state} status")
    first = next(i for i, s in enumerate(seen) if s["state"] == until_state)
    return seen[: first + 1]


def assert_causal_order(records: list[Record], checkouts: list[Checkout]) -> None:
    """Children before parents: a command for an event is sent only after the
    commands for every event it caused (CreateTime, set by the worker at send)."""
    first_sent: dict[str, int] = {}
    for record in records:
        assert record.compensates is not None
        first_sent[record.compensates] = min(
            record.timestamp, first_sent.get(record.compensates, record.timestamp)
        )
    checked = 0
    for item in checkouts:
        for child, parent in item.caused_by.items():
            if child in first_sent and parent in first_sent:
                assert first_sent[child] <= first_sent[parent], (
                    f"{item.order_id}: the command for {parent} was sent at {first_sent[parent]}, "
                    f"before the one for {child} it caused ({first_sent[child]})"
                )
                checked += 1
    assert checked, "no causal pair was compensated: the test data is wrong"


def assert_commands(
    by_key: dict[str, list[Record]], stack: Stack, checkouts: list[Checkout], rollback_id: str
) -> None:
    """Each expected command, on its service's topic, with the contract's headers."""
    expected = expected_commands(checkouts)
    assert set(by_key) == set(expected), "commands for other events than the blast radius"
    for key, records in by_key.items():
        want = expected[key]
        for record in records:
            assert record.topic == stack.command_topic(want.service), record
            assert record.json() == want.value, record
            assert record.key == want.value["order_id"].encode(), record
            assert record.idempotency_key == key
            assert record.rollback_id == rollback_id
            assert record.compensates == want.event_id
            assert record.header("traceparent"), f"no trace context on {record}"
