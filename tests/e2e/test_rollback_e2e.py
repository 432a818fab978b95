"""Issue #3: rollbacks end to end — real broker, real worker processes, the real CLI.

Every test runs with SQLite and with PostgreSQL as the ledger. Services are
played by the test: it produces their events and, through a
`CommandCollector`, reads the compensation commands Backout sends them and
answers with confirmation events as a real service would. Nothing sleeps and
hopes: every wait is on a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from schemas.dlq import (
    ERROR_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from schemas.signal import RollbackSignal
from tests.e2e.observe import (
    assert_causal_order,
    assert_commands,
    deployments,
    detail,
    final_status,
    fresh_checkouts,
    publish,
    publish_tracked,
    statuses_of,
    wait_state,
    wait_tracked,
)
from tests.e2e.shop import STEP_CANCEL, STEP_RELEASE, checkout, expected_commands, type_counts
from tests.e2e.stack import Stack
from tests.support.kafka import Producer, envelope, read_topic
from tests.support.names import unique_name

pytestmark = pytest.mark.e2e

MakeStack = Callable[..., Awaitable[Stack]]

# ---------------------------------------------------------------------- scenarios


async def test_rollback_compensates_across_services_in_causal_order(shared_stack: Stack) -> None:
    """The issue's main story, through `backout rollback --wait`."""
    stack = shared_stack
    orders, payments, stock = deployments()
    other_orders = unique_name("orders", "-1.0")  # an older rollout: must be left alone
    checkouts = [
        checkout(
            unique_name("o"),
            orders=orders,
            payments=payments,
            stock=stock,
            version=1,
            chain=True,
            emailed=True,
        ),
        checkout(unique_name("o"), orders=orders, payments=payments, stock=stock, viewed=True),
        checkout(unique_name("o"), orders=orders, payments=payments, stock=stock, reserve=False),
    ]
    untouched = checkout(unique_name("o"), orders=other_orders, payments=payments, stock=stock)
    expected = expected_commands(checkouts)

    async with stack.collector() as service:
        service.hold_confirmations()
        # `untouched` is of another orders deployment: none of its events count here.
        await publish_tracked(stack, [*checkouts, untouched], orders)
        await wait_tracked(stack, payments, type_counts([*checkouts, untouched], payments))

        cli = asyncio.create_task(
            stack.rollback(orders, "--reason", "e2e: error rate", "--wait", signal_id=None)
        )
        # The children's undo goes out first (refunds, releases); a parent's
        # (the order's cancel) waits until its children's undo is confirmed.
        children = {k for k, c in expected.items() if c.step != STEP_CANCEL}
        by_key = await service.wait_for_keys(children)
        rollback_id = next(iter(by_key.values()))[0].rollback_id
        assert rollback_id is not None
        waiting = await wait_state(stack, rollback_id, {"running"}, applied=len(children))
        assert waiting["confirmed"] == 0
        held = {c["idempotency_key"]: c["state"] for c in waiting["compensations"]}
        assert held == {k: "applied" if k in children else "pending" for k in expected}
        assert not cli.done(), "the CLI returned before the confirmations arrived"
        # Confirmations flip refunds to confirmed, which releases the cancels.
        service.release_confirmations()
        result = await cli

    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.splitlines()[0].strip() == rollback_id
    assert "completed_with_warnings" in result.stdout
    assert "1 manual action" in result.stderr

    by_key = service.by_key(rollback_id)
    assert_commands(by_key, stack, checkouts, rollback_id)
    assert all(len(records) == 1 for records in by_key.values()), "a command was sent twice"
    assert untouched.order_event_id not in {r.compensates for r in service.records}
    assert_causal_order(service.of(rollback_id), checkouts)

    confirmed = sum(1 for c in expected.values() if c.confirmed)
    body = await detail(stack, rollback_id)
    assert body["state"] == "completed_with_warnings"
    assert body["deployment_id"] == orders
    assert (body["planned"], body["applied"], body["confirmed"]) == (8, 8, confirmed)
    assert len(expected) == 8
    assert (body["failed"], body["skipped"], body["manual"], body["uncovered"]) == (0, 0, 1, 0)
    states = {c["idempotency_key"]: c["state"] for c in body["compensations"]}
    assert states == {k: "confirmed" if c.confirmed else "applied" for k, c in expected.items()}
    position = {c["event_id"]: c["position"] for c in body["compensations"]}
    for item in checkouts:
        for child, parent in item.caused_by.items():
            if child in position and parent in position:
                assert position[child] < position[parent]
    assert [a["event_id"] for a in body["manual_actions"]] == checkouts[0].manual

    final = await final_status(stack, rollback_id)
    assert final["state"] == "completed_with_warnings"
    assert final["deployment_id"] == orders
    for name in ("planned", "applied", "confirmed", "failed", "manual", "uncovered", "late"):
        assert final[name] == body[name], name
    assert final["error"] is None


async def test_dry_run_plans_without_commands(shared_stack: Stack) -> None:
    """`--dry-run`: `planned`, nothing sent; the real rollback afterwards sends it all."""
    stack = shared_stack
    orders, checkouts = fresh_checkouts(1)
    dry_id, real_id = str(uuid.uuid4()), str(uuid.uuid4())

    async with stack.collector({real_id}) as service:
        await publish_tracked(stack, checkouts, orders)
        result = await stack.rollback(orders, "--dry-run", "--wait", signal_id=dry_id)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0].strip() == dry_id
        planned = await detail(stack, dry_id)
        assert (planned["state"], planned["dry_run"], planned["planned"]) == ("planned", True, 3)
        assert planned["applied"] == 0
        assert {c["state"] for c in planned["compensations"]} == {"pending"}

        # The real rollback of the same deployment is a barrier: had the dry
        # run started anything, its commands would be on the topics by now.
        result = await stack.rollback(orders, "--wait", signal_id=real_id)
        assert result.returncode == 0, result.stderr

    assert [r for r in service.records if r.rollback_id == dry_id] == []
    assert set(service.by_key(real_id)) == set(expected_commands(checkouts))
    assert (await final_status(stack, dry_id))["state"] == "planned"
    assert (await final_status(stack, real_id))["state"] == "completed"


async def test_duplicate_signal_is_one_rollback(shared_stack: Stack) -> None:
    """The same `--signal-id` twice: one rollback, each command once."""
    stack = shared_stack
    orders, checkouts = fresh_checkouts(2)
    rollback_id, barrier_id = str(uuid.uuid4()), str(uuid.uuid4())

    async with stack.collector({rollback_id}) as service:
        await publish_tracked(stack, checkouts, orders)
        first, second = await asyncio.gather(
            stack.rollback(orders, signal_id=rollback_id),
            stack.rollback(orders, "--wait", signal_id=rollback_id),
        )
        assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
        # Signals with the same key share a partition and the worker takes them
        # one by one: once this later dry run is planned, both duplicates were handled.
        barrier = await stack.rollback(orders, "--dry-run", "--wait", signal_id=barrier_id)
        assert barrier.returncode == 0, barrier.stderr
        body = await wait_state(stack, rollback_id, {"completed"})

    by_key = service.by_key(rollback_id)
    assert set(by_key) == set(expected_commands(checkouts))
    assert {k: len(v) for k, v in by_key.items() if len(v) != 1} == {}
    assert body["planned"] == body["applied"] == 6
    listed = [r["rollback_id"] for r in await stack.worker.get("/api/rollbacks")]
    assert listed.count(rollback_id) == 1
    history = await statuses_of(stack, rollback_id, "completed")
    assert [s["state"] for s in history].count("accepted") == 1


async def test_unknown_deployment_is_rejected(shared_stack: Stack) -> None:
    stack = shared_stack
    ghost = unique_name("ghost", "-9.9")
    rollback_id = str(uuid.uuid4())
    result = await stack.rollback(ghost, "--wait", signal_id=rollback_id)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ghost in result.stderr
    assert "unknown deployment" in result.stderr

    final = await final_status(stack, rollback_id)
    assert final["state"] == "rejected"
    assert ghost in final["error"]
    assert "unknown deployment" in final["error"]
    [letter] = await read_topic(
        stack.bootstrap,
        stack.dlq_topic,
        lambda r: r.value is not None and ghost.encode() in r.value,
        what="the rejected signal on the DLQ",
    )
    assert letter.json()["signal_id"] == rollback_id
    assert "unknown deployment" in (letter.header(ERROR_HEADER) or "")
    assert letter.header(SOURCE_TOPIC_HEADER) == stack.signals_topic


async def test_blast_radius_guard_needs_force(shared_stack: Stack) -> None:
    """15 compensations against BACKOUT_MAX_COMPENSATIONS=12: rejected; --force runs it."""
    stack = shared_stack
    orders, checkouts = fresh_checkouts(5)
    refused_id, forced_id = str(uuid.uuid4()), str(uuid.uuid4())

    async with stack.collector({forced_id}) as service:
        await publish_tracked(stack, checkouts, orders)
        refused = await stack.rollback(orders, "--wait", signal_id=refused_id)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "BACKOUT_MAX_COMPENSATIONS=12" in refused.stderr
        assert "15 compensations" in refused.stderr
        forced = await stack.rollback(orders, "--force", "--wait", signal_id=forced_id)
        assert forced.returncode == 0, forced.stdout + forced.stderr

    assert (await final_status(stack, refused_id))["state"] == "rejected"
    assert [r for r in service.records if r.rollback_id == refused_id] == []
    body = await detail(stack, forced_id)
    assert (body["state"], body["planned"], body["applied"], body["confirmed"]) == (
        "completed",
        15,
        15,
        10,
    )
    assert set(service.by_key(forced_id)) == set(expected_commands(checkouts))


async def test_bad_records_go_to_the_dlq_and_tracking_goes_on(shared_stack: Stack) -> None:
    stack = shared_stack
    topic = stack.events_topic("orders")
    orders, payments, stock = deployments()
    marker = unique_name("bad")  # in every bad record, to find them on the shared DLQ
    good = checkout(marker, orders=orders, payments=payments, stock=stock)
    wrong_type = envelope(
        "ItemOrdered",
        service="orders",
        deployment_id=orders,
        schema_version=2,
        payload={"order_id": marker, "quantity": "many"},
        key=marker,
    )
    unknown = envelope(
        "Teleported", service="orders", deployment_id=orders, payload={"to": "mars"}, key=marker
    )

    async with Producer(stack.bootstrap) as producer:
        sent = {
            "json": await producer.send(
                topic, b'{"event_id": "' + marker.encode() + b'", ', key=marker
            ),
            "type": await producer.send(
                topic, wrong_type, key=marker, headers=[("x-origin", b"e2e")]
            ),
            "unknown": await producer.send(topic, unknown, key=marker),
        }
    await publish(stack, [good])  # same key, same partition: strictly after the bad ones

    await wait_tracked(stack, orders, {"ItemOrdered v2": 1})
    await wait_tracked(stack, payments, {"Charged v1": 1})
    await wait_tracked(stack, stock, {"Reserved v1": 1})

    letters = await read_topic(
        stack.bootstrap,
        stack.dlq_topic,
        lambda r: r.value is not None and marker.encode() in r.value,
        count=3,
        what="dead letters",
    )
    by_offset = {int(r.header(SOURCE_OFFSET_HEADER) or -1): r for r in letters}
    assert len(letters) == 3, [str(r) for r in letters]
    for kind, metadata in sent.items():
        letter = by_offset[metadata.offset]
        assert letter.header(SOURCE_TOPIC_HEADER) == topic
        assert letter.header(SOURCE_PARTITION_HEADER) == str(metadata.partition)
        error = letter.header(ERROR_HEADER) or ""
        assert error, letter
        assert error.isprintable(), error
        if kind == "json":
            assert "not JSON" in error, error
        elif kind == "type":
            assert "quantity" in error, error
            assert letter.header("x-origin") == "e2e", "the original headers are kept"
            assert letter.json() == wrong_type, "the original bytes are kept"
        else:
            assert "Teleported" in error, error
            assert "BACKOUT_UNKNOWN_EVENTS" in error, error


async def test_late_event_is_compensated(shared_stack: Stack) -> None:
    """An event of the rolled-back deployment arriving after the rollback is undone too."""
    stack = shared_stack
    orders, payments, stock = deployments()
    checkouts = [
        checkout(unique_name("o"), orders=orders, payments=payments, stock=stock, reserve=False)
    ]
    rollback_id = str(uuid.uuid4())

    async with stack.collector({rollback_id}) as service:
        await publish_tracked(stack, checkouts, orders)
        result = await stack.rollback(orders, "--wait", signal_id=rollback_id)
        assert result.returncode == 0, result.stdout + result.stderr
        done = await detail(stack, rollback_id)
        assert (done["state"], done["planned"], done["late"]) == ("completed", 2, 0)

        # Traffic still draining from the bad version: an order after the signal.
        late = checkout(
            unique_name("o"),
            orders=orders,
            payments=payments,
            stock=stock,
            charge=False,
            occurred_at=datetime.now(UTC),
        )
        await publish(stack, [late])
        await service.wait_for_keys(late.commands, rollback_id=rollback_id)
        body = await wait_state(stack, rollback_id, {"completed"}, late=1, confirmed=3)

    assert body["planned"] == 3
    late_items = {c["idempotency_key"] for c in body["compensations"] if c["late"]}
    assert late_items == set(late.commands)
    history = await statuses_of(stack, rollback_id, "completed")
    assert history[-1]["late"] == 0  # the first completion
    records = await read_topic(
        stack.bootstrap,
        stack.status_topic,
        lambda r: (
            r.json()["rollback_id"] == rollback_id
            and r.json()["late"] == 1
            and r.json()["state"] == "completed"
        ),
        what="completed status counting the late event",
    )
    assert records[0].json()["planned"] == 3


# ------------------------------------------------------------- workers of their own


async def test_killed_worker_resumes_the_rollback(ledger_url: str, make_stack: MakeStack) -> None:
    """SIGKILL mid-rollback, restart: every compensation done, none lost, little redone.

    The services hold their confirmations across the crash, so the restarted
    worker also has to pick up compensations the dead one applied and that
    still wait for their confirmation.
    """
    concurrency = 2
    stack = await make_stack(ledger_url, BACKOUT_CONCURRENCY=str(concurrency))
    orders, checkouts = fresh_checkouts(12, release_delay=0.25)
    expected = expected_commands(checkouts)
    children = {k for k, c in expected.items() if c.step != STEP_CANCEL}
    rollback_id = str(uuid.uuid4())

    async with stack.collector({rollback_id}) as service:
        service.hold_confirmations()
        await publish_tracked(stack, checkouts, orders)
        result = await stack.rollback(orders, signal_id=rollback_id)
        assert result.returncode == 0, result.stderr

        await service.wait_for_count(4, rollback_id=rollback_id)
        before = await detail(stack, rollback_id)
        stack.worker.kill()
        assert before["state"] == "running", before
        assert before["applied"] < len(children), before
        print(f"killed with {before['applied']}/{before['planned']} applied")

        await stack.worker.start()
        await service.wait_for_keys(children, rollback_id=rollback_id, timeout=30)
        held = await wait_state(stack, rollback_id, {"running"}, applied=len(children))
        assert {c["state"] for c in held["compensations"] if c["step"] == STEP_CANCEL} == {
            "pending"
        }
        service.release_confirmations()
        body = await wait_state(stack, rollback_id, {"completed"}, timeout=60)
        by_key = await service.wait_for_keys(expected, rollback_id=rollback_id)

    assert (body["planned"], body["applied"], body["failed"]) == (36, 36, 0)
    assert body["confirmed"] == sum(1 for c in expected.values() if c.confirmed)
    assert {c["state"] for c in body["compensations"] if c["step"] == STEP_RELEASE} == {"applied"}
    assert {c["state"] for c in body["compensations"] if c["step"] != STEP_RELEASE} == {"confirmed"}
    assert set(by_key) == set(expected)
    assert_commands(by_key, stack, checkouts, rollback_id)
    # At-least-once, but only what was in flight at the kill may run again.
    redone = {k: len(v) for k, v in by_key.items() if len(v) > 1}
    assert len(redone) <= concurrency, redone
    assert_causal_order(service.of(rollback_id), checkouts)

    status = await stack.cli("status", rollback_id, "--format", "json")
    assert status.returncode == 0, status.stderr
    final = json.loads(status.stdout)
    assert (final["state"], final["applied"], final["planned"]) == ("completed", 36, 36)


async def test_signed_signals(ledger_url: str, make_stack: MakeStack) -> None:
    """With BACKOUT_SIGNAL_KEY: an unsigned signal is rejected, the CLI's signed one runs."""
    stack = await make_stack(ledger_url, BACKOUT_SIGNAL_KEY="e2e-" + uuid.uuid4().hex)
    orders, checkouts = fresh_checkouts(1)
    forged_id, signed_id = str(uuid.uuid4()), str(uuid.uuid4())

    async with stack.collector({signed_id}) as service:
        await publish_tracked(stack, checkouts, orders)

        forged = RollbackSignal(
            signal_id=forged_id, deployment_id=orders, issued_at=datetime.now(UTC)
        )
        async with Producer(stack.bootstrap) as producer:
            await producer.send(stack.signals_topic, forged.canonical_bytes(), key=orders)
        rejected = await final_status(stack, forged_id)
        assert rejected["state"] == "rejected"
        assert "backout-signature" in rejected["error"]
        [letter] = await read_topic(
            stack.bootstrap,
            stack.dlq_topic,
            lambda r: r.value is not None and forged_id.encode() in r.value,
            what="the unsigned signal on the DLQ",
        )
        assert "missing backout-signature" in (letter.header(ERROR_HEADER) or "")
        assert letter.value == forged.canonical_bytes()

        result = await stack.rollback(orders, "--wait", signal_id=signed_id)
        assert result.returncode == 0, result.stdout + result.stderr

    assert [r for r in service.records if r.rollback_id == forged_id] == []
    assert set(service.by_key(signed_id)) == set(expected_commands(checkouts))
    assert (await final_status(stack, signed_id))["state"] == "completed"
