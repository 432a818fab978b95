"""Crash loop: SIGKILL the worker at random moments of a big rollback, again and again.

DESIGN §4, crash safety: a worker killed at any point resumes every
unfinished rollback from the ledger; nothing is lost and nothing done is
redone (a handler may run again, always with the same key). The worker is
killed while it tracks the events, while it plans, while it executes, while
compensations wait for their confirmations and (full variant) while it starts
up and resumes; each time it is restarted with the same app id and ledger.

At the end:
- every compensation is confirmed, in the ledger and in the status counts;
- the services applied every expected key exactly once and nothing else
  (raw deliveries of a key may be more than one);
- every delivery is covered by an attempt the ledger recorded before it
  (deliveries of a key <= its attempts), and only work in flight at a kill was
  redone (re-run attempts <= kills x concurrency);
- per saga instance, the services applied the keys in exactly the plan's
  order (children before parents, reverse step order);
- nothing of another deployment was touched, nothing was dead-lettered.

The default variant is short (100 instances, 400+ compensations, 5 kills);
`pytest -m slow` runs 500 instances, 2,000+ compensations, 15 kills.
`CHAOS_SEED=<n>` replays a run's random choices (the seed is printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.reliability.conftest import TERMINAL, ChaosStack, MakeStack, report
from tests.support import chaos
from tests.support.worker import WorkerError

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Scale:
    """How big a crash loop is."""

    instances: int
    compensations: int
    bystanders: int  # instances of a deployment that is not rolled back
    kills: tuple[str, ...]  # phase of each kill, in order
    production_seconds: float  # how long producing the events takes
    timeout: float  # seconds the rollback may take after the last kill


DEFAULT = Scale(
    instances=100,
    compensations=400,
    bystanders=10,
    kills=("tracking", "planning", "execution", "confirmation", "execution"),
    production_seconds=3.0,
    timeout=120.0,
)
FULL = Scale(
    instances=500,
    compensations=2000,
    bystanders=50,
    kills=(
        "tracking",
        "tracking",
        "planning",
        "startup",
        "execution",
        "confirmation",
        "execution",
        "startup",
        "confirmation",
        "execution",
        "execution",
        "confirmation",
        "execution",
        "confirmation",
        "execution",
    ),
    production_seconds=12.0,
    timeout=300.0,
)


@dataclass
class Chaos:
    """Kills a stack's worker and restarts it, keeping the figures."""

    stack: ChaosStack
    rng: random.Random
    kills: list[tuple[str, str]] = field(default_factory=list)  # (phase, what was seen)
    ready: list[float] = field(default_factory=list)  # restart → ready, seconds

    async def kill(self, phase: str, seen: str, *, restart: bool = True) -> None:
        """SIGKILL now; restart after a short random downtime (unless told not to)."""
        self.stack.worker.kill()
        self.kills.append((phase, seen))
        print(f"kill #{len(self.kills)} during {phase}: {seen}")
        if restart:
            await self.restart()

    async def restart(self) -> None:
        """Start the worker again (same app id, same ledger) after a random downtime."""
        await asyncio.sleep(self.rng.uniform(0.0, 1.0))
        self.ready.append(await self.stack.worker.start())

    async def kill_while_starting(self) -> None:
        """Start the worker and SIGKILL it during start-up (migration, joins, resume)."""
        starting = asyncio.create_task(self.stack.worker.start())
        await asyncio.sleep(self.rng.uniform(0.5, 4.0))
        became_ready = starting.done()
        self.stack.worker.kill()
        with contextlib.suppress(WorkerError):  # killed before ready: this phase's point
            await starting
        self.kills.append(("startup", "after ready" if became_ready else "before ready"))
        print(f"kill #{len(self.kills)} during startup")
        await self.restart()


async def progress(stack: ChaosStack, rollback_id: str) -> dict[str, Any] | None:
    """The rollback's counts from the API, None while unknown or the worker is down."""
    try:
        return await stack.counts(rollback_id)
    except OSError:
        return None


def describe(body: dict[str, Any] | None) -> str:
    if body is None:
        return "rollback not known yet"
    return (
        f"{body['state']}, applied {body['applied']}/{body['planned']}, "
        f"confirmed {body['confirmed']}"
    )


async def kill_at_progress(
    chaos_: Chaos,
    rollback_id: str,
    phase: str,
    fraction: float,
    timeout: float,
    *,
    restart: bool = True,
) -> bool:
    """Kill once `fraction` of the plan is applied; False if the rollback ended first."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = await progress(chaos_.stack, rollback_id)
        if body is not None and body["state"] in TERMINAL:
            return False
        if body is not None and body["planned"] and body["applied"] >= fraction * body["planned"]:
            await chaos_.kill(phase, describe(body), restart=restart)
            return True
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no progress to {fraction:.0%} within {timeout:g}s: {body}")
        await asyncio.sleep(0.03)


async def kill_awaiting_confirmations(
    chaos_: Chaos, services: chaos.ServiceDouble, rollback_id: str, timeout: float
) -> bool:
    """Hold the services' confirmations, kill while compensations wait for them,
    release them while the worker is down or after it is back."""
    wanted = chaos_.rng.randint(3, 30)
    services.hold()
    held_from = len(services.applied)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            body = await progress(chaos_.stack, rollback_id)
            if body is not None and body["state"] in TERMINAL:
                return False
            # Applied by the services since the hold, so unconfirmed for sure.
            waiting = len(services.applied) - held_from
            remaining = body["planned"] - body["applied"] if body else wanted
            if body is not None and waiting >= min(wanted, remaining):
                break
            if asyncio.get_running_loop().time() > deadline:
                break  # kill anyway: whatever is in flight now
            await asyncio.sleep(0.03)
        release_while_down = chaos_.rng.random() < 0.5
        seen = f"{describe(body)}, {len(services.applied) - held_from} applied since the hold"
        await chaos_.kill("confirmation", seen, restart=False)
        if release_while_down:
            services.release()
        await chaos_.restart()
    finally:
        services.release()
    return True


async def kill_while_planning(
    chaos_: Chaos, producer: chaos.EventProducer, deployment_id: str
) -> str:
    """Send the signal and kill the worker early: before it reads the signal, while it
    plans, or just after; returns the rollback id."""
    rollback_id = await producer.signal(chaos_.stack.signals_topic, deployment_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + chaos_.rng.uniform(0.3, 2.5)
    body = None
    while loop.time() < deadline:
        body = await progress(chaos_.stack, rollback_id)
        if body is not None and body["state"] in ("accepted", "planning"):
            break
        await asyncio.sleep(0.01)
    await chaos_.kill("planning", describe(body))
    return rollback_id


async def crash_loop(stack: ChaosStack, scale: Scale, seed: int) -> None:
    rng = random.Random(seed)
    clock = chaos.Stopwatch()
    concurrency = int(stack.env["BACKOUT_CONCURRENCY"])
    deployment_ids = chaos.deployments(stack.tag)
    bad = f"bookings-{stack.tag}-bad"
    targets = chaos.build_instances(
        rng,
        scale.instances,
        deployment_ids=deployment_ids,
        booking_deployment=bad,
        min_compensations=scale.compensations,
    )
    bystanders = chaos.build_instances(rng, scale.bystanders, deployment_ids=deployment_ids)
    everything = targets + bystanders
    rng.shuffle(everything)
    expected = chaos.expected_keys(targets)
    events = sum(len(i.events) for i in everything)
    chaos_ = Chaos(stack, rng)
    phases = list(scale.kills)
    services = stack.services(apply_delay=rng.uniform(0.0, 0.004))
    print(
        f"seed {seed}: {len(targets)} instances, {len(expected)} compensations, "
        f"{events} events, kills {phases}"
    )

    async with services, stack.producer() as producer:
        await stack.worker.start()

        # Tracking: the events arrive while the worker is killed and restarted.
        batch = 25
        pace = scale.production_seconds / max(events / batch, 1)
        producing = asyncio.create_task(producer.events(everything, pace=pace, batch=batch))
        tracking_kills = 0
        while phases and phases[0] == "tracking":
            phases.pop(0)
            tracking_kills += 1
            await asyncio.sleep(rng.uniform(0.15, 0.5) * scale.production_seconds)
            tracked = 0
            try:
                for summary in (await stack.fetch("/api/deployments"))[1]:
                    tracked += summary["events"] if summary["deployment_id"] == bad else 0
            except OSError:
                pass
            await chaos_.kill("tracking", f"{tracked} events of {bad} tracked")
        await producing
        await stack.wait_tracked(bad, chaos.type_counts(everything, bad))
        for deployment_id in deployment_ids.values():
            await stack.wait_tracked(deployment_id, chaos.type_counts(everything, deployment_id))

        # Planning: killed around the moment the signal is read and planned.
        assert phases.pop(0) == "planning"
        rollback_id = await kill_while_planning(chaos_, producer, bad)

        # Execution, confirmations, start-up: at increasing points of progress.
        remaining = len(phases)
        for index, phase in enumerate(phases):
            fraction = (index + rng.uniform(0.2, 0.8)) / (remaining + 1)
            if phase == "startup":
                # Killed mid-execution, then killed again while starting (and resuming).
                if not await kill_at_progress(
                    chaos_, rollback_id, "execution", fraction, 60, restart=False
                ):
                    break
                await chaos_.kill_while_starting()
                continue
            if phase == "confirmation":
                done = await kill_awaiting_confirmations(chaos_, services, rollback_id, 20)
            else:
                done = await kill_at_progress(chaos_, rollback_id, phase, fraction, 60)
            if not done:
                print(f"rollback ended before the {phase} kill at {fraction:.0%}")
                break

        final = await stack.wait_state(rollback_id, TERMINAL, timeout=scale.timeout)
        await services.wait_applied(expected, timeout=30)
        status, letters = await stack.fetch("/api/dead-letters")
    elapsed = clock.seconds

    # The rollback, as the API and the ledger tell it.
    assert final["state"] == "completed", final
    n = len(expected)
    assert (final["planned"], final["applied"], final["confirmed"]) == (n, n, n), final
    assert (final["failed"], final["skipped"]) == (0, 0), final
    items = await stack.compensations(rollback_id)
    assert {i.idempotency_key for i in items} == set(expected)
    assert {i.state.value for i in items} == {"confirmed"}
    attempts = {i.idempotency_key: i.attempts for i in items}
    assert status == 200, letters
    assert letters == [], letters

    # What the services saw.
    assert set(services.applied) == set(expected), "a key was missed or a stranger applied"
    assert set(services.deliveries) == set(expected), "a bystander's compensation was sent"
    assert services.without_key == 0
    uncovered = {
        k: (services.deliveries[k], a) for k, a in attempts.items() if services.deliveries[k] > a
    }
    assert not uncovered, (
        f"deliveries without a recorded attempt (deliveries, attempts): {uncovered}"
    )
    redone = sum(attempts.values()) - n
    kills = len(chaos_.kills)
    assert redone <= kills * concurrency, f"{redone} attempts redone after {kills} kills"
    wrong_order = {
        item.order_id: (services.applied_order.get(item.order_id), item.undo_order)
        for item in targets
        if services.applied_order.get(item.order_id) != item.undo_order
    }
    assert not wrong_order, f"{len(wrong_order)} instances undone out of order: {wrong_order}"

    report(
        f"crash loop [{ledger_kind(stack)}] seed {seed}: survived {kills} kills "
        f"({', '.join(p for p, _ in chaos_.kills)}); {n} compensations over {len(targets)} "
        f"instances; duplicates delivered {services.duplicates} "
        f"(attempts redone {redone}); total {elapsed:.1f}s; "
        f"restart-to-ready mean {chaos.mean(chaos_.ready):.2f}s "
        f"(max {max(chaos_.ready, default=0):.2f}s)"
    )
    for phase, seen in chaos_.kills:
        print(f"  killed during {phase}: {seen}")


def ledger_kind(stack: ChaosStack) -> str:
    return "postgres" if stack.database_url.startswith("postgresql") else "sqlite"


async def test_crash_loop(ledger_url: str, make_chaos_stack: MakeStack) -> None:
    """5 SIGKILLs across a 400-compensation rollback; everything done once, in order."""
    stack = await make_chaos_stack(ledger_url)
    await crash_loop(stack, DEFAULT, chaos.seed_from_env())


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_crash_loop_full(ledger_url: str, make_chaos_stack: MakeStack) -> None:
    """15 SIGKILLs (start-up included) across 2,000+ compensations of 500 instances."""
    stack = await make_chaos_stack(ledger_url)
    await crash_loop(stack, FULL, chaos.seed_from_env())
