"""Outages: the ledger database goes away for a while; the broker restarts empty.

Ledger outage (SQLite and PostgreSQL), once while the worker tracks events and
once while it executes a rollback:
- PostgreSQL: the database refuses connections (`ALLOW_CONNECTIONS false`)
  and every session on it is terminated; SQLite: another connection holds the
  write lock (`BEGIN EXCLUSIVE`; chmod would not stop root).
- No offset is committed past unsaved work: while the ledger is down, the
  tracker group's committed offsets never pass the first event produced
  during the outage; afterwards every such event is in the ledger with its
  topic, partition and offset, and the offsets move on.
- The worker recovers by itself (same process, `/health` 200 again), nothing is
  lost, the rollback running through the outage completes, and a signal that
  arrived during the outage is carried out too.

Broker restart: Tansu keeps everything in memory, so a restart loses every
topic, offset and group. The ledger keeps what was tracked; the worker, not
restarted, reconnects, tracks the new broker's events from their first
offset, finishes the rollback in flight (re-sending, same keys, what the
broker lost) and runs a signal sent at once. docs/guarantees.md ("Outages")
says what Backout does. A signal racing the tracker like that one relies on
late events being compensated transitively, which a harness test checks
without a broker.

Default outages last ~6 s; `pytest -m slow` holds them for 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from consumers.broker import EmbeddedBroker
from tests.reliability.conftest import TERMINAL, ChaosStack, MakeStack, report
from tests.support import chaos
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

PARTITIONS = 4


def ledger_kind(url: str) -> str:
    return "postgres" if url.startswith("postgresql") else "sqlite"


async def health(stack: ChaosStack) -> int:
    """The worker's /health status code (0 when it does not answer)."""
    try:
        status, _ = await stack.worker.fetch("/health")
    except OSError:
        return 0
    return status


async def wait_progress(stack: ChaosStack, rollback_id: str, beyond: int, timeout: float) -> float:
    """Seconds until the rollback's `applied` count passes `beyond` (or it ends)."""
    started = time.monotonic()

    async def moved() -> bool:
        body = await stack.counts(rollback_id)
        return body is not None and (body["applied"] > beyond or body["state"] in TERMINAL)

    await wait_for(
        moved, timeout=timeout, interval=0.1, message="progress after the outage", ignore=(OSError,)
    )
    return time.monotonic() - started


def check_services(
    services: chaos.ServiceDouble, instances: list[chaos.Instance], attempts: dict[str, int]
) -> None:
    """Every key applied once, in plan order per instance, each delivery covered by an attempt."""
    expected = chaos.expected_keys(instances)
    assert set(services.applied) == set(expected)
    assert set(services.deliveries) == set(expected)
    uncovered = {
        k: (services.deliveries[k], a) for k, a in attempts.items() if services.deliveries[k] > a
    }
    assert not uncovered, f"deliveries without a recorded attempt: {uncovered}"
    wrong = [
        i.order_id for i in instances if services.applied_order.get(i.order_id) != i.undo_order
    ]
    assert not wrong, f"{len(wrong)} instances undone out of order"


async def ledger_outage(
    stack: ChaosStack, admin_dsn: str | None, seconds: float, seed: int
) -> None:
    rng = random.Random(seed)
    kind = ledger_kind(stack.database_url)
    deployment_ids = chaos.deployments(stack.tag)
    bad, other = f"bookings-{stack.tag}-a", f"bookings-{stack.tag}-b"
    first = chaos.build_instances(rng, 30, deployment_ids=deployment_ids, booking_deployment=bad)
    during = chaos.build_instances(rng, 30, deployment_ids=deployment_ids, booking_deployment=bad)
    second = chaos.build_instances(rng, 10, deployment_ids=deployment_ids, booking_deployment=other)
    targets = first + during
    n = len(chaos.expected_keys(targets))
    # Services slow enough (~6 s for the whole rollback) that it is still
    # running when the ledger goes.
    services = stack.services(apply_delay=6.0 / n)
    partitions = [(t, p) for t in stack.event_topics for p in range(PARTITIONS)]
    print(f"seed {seed}: {kind} outages of {seconds:g}s")

    async with services, stack.producer() as producer:
        await stack.worker.start()
        process = stack.worker.process
        assert process is not None
        await producer.events(first + second)
        await stack.wait_tracked(bad, chaos.type_counts(first, bad))
        await stack.wait_tracked(other, chaos.type_counts(second, other))

        # 1. Outage while tracking.
        samples, health_seen = 0, set()
        async with chaos.ledger_outage(stack.database_url, admin_dsn) as what:
            started = time.monotonic()
            placed = await producer.events(during)
            first_unsaved: dict[tuple[str, int], int] = {}
            for topic, partition, offset, _ in placed:
                slot = (topic, partition)
                first_unsaved[slot] = min(first_unsaved.get(slot, offset), offset)
            while time.monotonic() - started < seconds:
                committed = await chaos.committed_offsets(
                    stack.bootstrap, stack.tracker_group, partitions
                )
                ahead = {
                    tp: (committed[tp], o) for tp, o in first_unsaved.items() if committed[tp] > o
                }
                assert not ahead, f"offsets committed past unsaved events: {ahead}"
                health_seen.add(await health(stack))
                samples += 1
                await asyncio.sleep(0.25)
        ended = time.monotonic()
        await stack.wait_tracked(bad, chaos.type_counts(targets, bad), timeout=60)
        tracking_recovery = time.monotonic() - ended
        stored = await stack.wait_stored(placed)
        assert stored == {e: (t, p, o) for t, p, o, e in placed}
        last = {}
        for topic, partition, offset, _ in placed:
            last[(topic, partition)] = max(last.get((topic, partition), offset), offset)

        async def committed_past() -> bool:
            committed = await chaos.committed_offsets(
                stack.bootstrap, stack.tracker_group, partitions
            )
            return all(committed[tp] > o for tp, o in last.items())

        await wait_for(committed_past, timeout=30, interval=0.2, message="offsets committed")
        print(
            f"tracking outage: {what}; {len(placed)} events produced during it, "
            f"{samples} offset checks, /health answered {sorted(health_seen)}"
        )

        # 2. Outage while a rollback runs; a second signal arrives during it.
        rollback_id = await producer.signal(stack.signals_topic, bad)
        fraction = rng.uniform(0.15, 0.4)

        async def midway() -> dict[str, Any] | None:
            body = await stack.counts(rollback_id)
            if body is None or not body["planned"]:
                return None
            assert body["state"] not in TERMINAL, f"ended before the outage: {body}"
            return body if body["applied"] >= fraction * body["planned"] else None

        before = await wait_for(midway, timeout=60, interval=0.05, message="rollback running")
        async with chaos.ledger_outage(stack.database_url, admin_dsn):
            started = time.monotonic()
            second_id = await producer.signal(stack.signals_topic, other)
            at_start = len(services.applied)
            while time.monotonic() - started < seconds:
                health_seen.add(await health(stack))
                await asyncio.sleep(0.25)
            during_outage = len(services.applied) - at_start
        ended = time.monotonic()
        body = await stack.counts(rollback_id)
        assert body is not None
        execution_recovery = await wait_progress(stack, rollback_id, body["applied"], 60)
        finals = {
            rollback_id: await stack.wait_state(rollback_id, TERMINAL, timeout=120),
            second_id: await stack.wait_state(second_id, TERMINAL, timeout=120),
        }
        completed = time.monotonic() - ended
        await services.wait_applied(chaos.expected_keys(targets + second), timeout=30)
        assert stack.worker.process is process, "the worker restarted"
        assert stack.worker.running, "the worker died"
        assert await health(stack) == 200

    for final in finals.values():
        assert final["state"] == "completed", final
        assert final["planned"] == final["applied"] == final["confirmed"], final
    attempts = {}
    for rid in finals:
        for item in await stack.compensations(rid):
            assert item.state.value == "confirmed", item
            attempts[item.idempotency_key] = item.attempts
    check_services(services, targets + second, attempts)
    code = await stack.worker.stop()
    assert code == 0, f"worker exited with {code} after the outages\n{stack.worker.log_tail()}"
    report(
        f"ledger outage [{kind}] seed {seed}: {seconds:g}s while tracking "
        f"({len(placed)} events, offsets held: {samples} checks) -> tracked "
        f"{tracking_recovery:.1f}s after; {seconds:g}s while executing (from "
        f"{before['applied']}/{before['planned']} applied; the services applied "
        f"{during_outage} commands sent before it) -> "
        f"progress {execution_recovery:.1f}s after, both rollbacks completed "
        f"{completed:.1f}s after (one signalled during the outage); no restart; "
        f"duplicates delivered {services.duplicates}; /health seen {sorted(health_seen)}"
    )


async def test_ledger_outage(
    ledger_url: str, make_chaos_stack: MakeStack, pg_admin_for: Callable[[str], str | None]
) -> None:
    """~6 s without the ledger while tracking, then while executing: nothing lost."""
    stack = await make_chaos_stack(ledger_url)
    await ledger_outage(stack, pg_admin_for(ledger_url), 6.0, chaos.seed_from_env())


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_ledger_outage_30s(
    ledger_url: str, make_chaos_stack: MakeStack, pg_admin_for: Callable[[str], str | None]
) -> None:
    """30 s without the ledger (past SQLite's 30 s busy timeout: writes fail, not wait)."""
    stack = await make_chaos_stack(ledger_url)
    await ledger_outage(stack, pg_admin_for(ledger_url), 30.0, chaos.seed_from_env())


# ---------------------------------------------------------------------- broker restart


async def test_broker_restart(sqlite_url: str, make_chaos_stack: MakeStack, tmp_path: Path) -> None:
    """The broker restarts empty mid-rollback: the rollback completes, tracking goes on."""
    rng = random.Random(seed := chaos.seed_from_env())
    brokers = [EmbeddedBroker(log_path=tmp_path / "tansu.log")]
    brokers[0].start(timeout=60)
    stack: ChaosStack | None = None
    try:
        # A short confirmation timeout: confirmations lost with the broker are
        # waited for this long before the command is sent again (same key).
        stack = await make_chaos_stack(
            sqlite_url, bootstrap=brokers[0].bootstrap, **{chaos.CONFIRM_TIMEOUT_ENV: "8"}
        )
        await broker_restart(stack, brokers, rng, seed)
    finally:
        for worker in stack.workers if stack is not None else []:
            await worker.stop()
        for broker in brokers:
            broker.stop()


async def broker_restart(
    stack: ChaosStack, brokers: list[EmbeddedBroker], rng: random.Random, seed: int
) -> None:
    """Restarts `brokers[-1]` mid-rollback (the new broker is appended to `brokers`)."""
    services = stack.services(apply_delay=0.01)
    try:
        await _broker_restart(stack, brokers, services, rng, seed)
    finally:
        with contextlib.suppress(Exception):  # the test's own failure matters more
            await services.stop()


async def _broker_restart(
    stack: ChaosStack,
    brokers: list[EmbeddedBroker],
    services: chaos.ServiceDouble,
    rng: random.Random,
    seed: int,
) -> None:
    deployment_ids = chaos.deployments(stack.tag)
    bad, later = f"bookings-{stack.tag}-a", f"bookings-{stack.tag}-b"
    before = chaos.build_instances(rng, 10, deployment_ids=deployment_ids, booking_deployment=bad)
    # More events after the restart than before: a consumer that kept its old
    # position would skip the first ones of every partition.
    after = chaos.build_instances(rng, 40, deployment_ids=deployment_ids, booking_deployment=later)
    partition = rng.randrange(PARTITIONS)
    clock = chaos.Stopwatch()
    async with stack.producer() as producer:
        await stack.worker.start()
        process = stack.worker.process
        await services.start()
        await producer.events(before)
        await stack.wait_tracked(bad, chaos.type_counts(before, bad))
        services.hold()
        rollback_id = await producer.signal(stack.signals_topic, bad, partition=partition)
        # Two dry runs behind it on the same signal partition: its offset is 3 now.
        dry = [
            await producer.signal(stack.signals_topic, bad, partition=partition, dry_run=True)
            for _ in range(2)
        ]
        for dry_id in dry:
            await stack.wait_state(dry_id, {"planned"}, timeout=30)
        await wait_for(lambda: len(services.applied) >= 5, timeout=30, message="commands applied")
    progress = await stack.counts(rollback_id)
    assert progress is not None
    assert progress["state"] == "running", progress

    # The broker dies with everything it held, confirmations not yet sent included.
    await services.stop()
    lost = services.forget_held()
    old = brokers[-1]
    old.stop()
    down_at = time.monotonic()
    await asyncio.sleep(rng.uniform(1.0, 3.0))
    brokers.append(EmbeddedBroker(port=old.port, log_path=old.log_path))
    brokers[-1].start(timeout=60)
    up_at = time.monotonic()
    print(f"broker restarted after {up_at - down_at:.1f}s; {lost} confirmations lost with it")

    async with stack.producer() as producer:
        # At once, before the worker has reconnected: new events, and a new
        # signal at offset 0 of the partition that held offsets 0-2 before.
        placed = await producer.events(after)
        second_id = await producer.signal(stack.signals_topic, later, partition=partition)
    services.release()
    await services.start()

    async def healthy() -> bool:
        return await health(stack) == 200

    await wait_for(healthy, timeout=60, interval=0.2, message="/health 200 after the restart")
    health_back = time.monotonic() - up_at
    await stack.wait_tracked(later, chaos.type_counts(after, later), timeout=60)
    tracking_back = time.monotonic() - up_at
    stored = await stack.wait_stored(placed)
    assert stored == {e: (t, p, o) for t, p, o, e in placed}
    final = await stack.wait_state(rollback_id, TERMINAL, timeout=90)
    in_flight_done = time.monotonic() - up_at
    second = await stack.wait_state(second_id, TERMINAL, timeout=60)
    await services.wait_applied(chaos.expected_keys(before + after), timeout=30)
    assert stack.worker.process is process, "the worker restarted"
    assert stack.worker.running, "the worker died"

    for body in (final, second):
        assert body["state"] == "completed", body
        assert body["planned"] == body["applied"] == body["confirmed"], body
    attempts = {}
    for rid in (rollback_id, second_id):
        for item in await stack.compensations(rid):
            assert item.state.value == "confirmed", item
            attempts[item.idempotency_key] = item.attempts
    check_services(services, before + after, attempts)
    report(
        f"broker restart seed {seed}: broker down {up_at - down_at:.1f}s mid-rollback "
        f"({progress['applied']}/{progress['planned']} applied, {lost} confirmations lost); "
        f"no worker restart: /health 200 {health_back:.1f}s after, {len(after)} instances' "
        f"events produced at once all tracked {tracking_back:.1f}s after, the in-flight "
        f"rollback completed {in_flight_done:.1f}s after (commands re-sent with the same keys: "
        f"{services.duplicates} duplicates), a signal sent at once to the same partition "
        f"completed ({second['planned']} planned, {second['late']} of them late); "
        f"total {clock.seconds:.1f}s"
    )


# ----------------------------------------------------------- what a restart exposes


@pytest.mark.parametrize("arrival", ["same batch", "descendant first"])
async def test_late_events_are_compensated_transitively(arrival: str) -> None:
    """After a broker restart a signal races the tracker: events caused, transitively,
    by the rolled-back deployment may be tracked after the plan, in one batch or a
    descendant before its cause (partitions are read in no particular order).
    Every one of them is compensated, children first."""
    from sagas.testing import SagaTestHarness

    async with SagaTestHarness(chaos.flow) as harness:

        async def sent(count: int) -> None:
            await wait_for(
                lambda: len(harness.sent) >= count,
                timeout=10,
                interval=0.01,
                message=f"{count} commands sent",
            )

        async def confirm(index: int) -> None:
            topic = harness.sent[index].topic
            kind = next(k for k in chaos.KINDS if topic.endswith(f".{k.service}.commands"))
            await harness.confirm(harness.sent[index], kind.confirmation)

        def event(event_type: str, deployment: str, cause: str | None) -> Any:
            return harness.envelope(
                event_type,
                {"order_id": "o1"},
                deployment_id=deployment,
                causation_id=cause,
                correlation_id="o1",
            )

        booked = event("Booked", "bookings-bad-1", None)
        await harness.emit(booked)
        record = await harness.rollback("bookings-bad-1", settle=False)
        await sent(1)
        await confirm(0)
        assert (await harness.settle(record.rollback_id)).state == "completed"

        charged = event("Charged", "payments-ok-1", booked.event_id)
        reserved = event("Reserved", "stock-ok-1", charged.event_id)
        if arrival == "same batch":
            await harness.emit(charged, reserved)
        else:
            await harness.emit(reserved)
            await harness.emit(charged)
        await sent(2)
        await confirm(1)
        await sent(3)
        await confirm(2)
        final = await harness.settle(record.rollback_id)

    services = [c.topic.rsplit(".", 2)[-2] for c in harness.sent]
    assert services == ["bookings", "stock", "payments"], services
    assert final.state == "completed"
