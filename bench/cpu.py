"""`python -m bench.cpu`: the CPU time Backout's own code spends per compensation.

The table of `python -m bench` times whole processes against a broker, and a
run's figures move by ±10% with the machine's load; a change worth 3% of a
compensation's CPU is lost in that. This measures the engine alone, in this
process, with nothing else running: the peer row's workload (`bench/peer_saga.py`,
N instances x 2 steps, no confirmations) or the rollback rows' (`bench/saga.py`,
4 steps over 3 services, each confirmed: the confirming events, built
beforehand, are tracked in batches as each round's commands are sent), tracked
into a fresh ledger, then one rollback through `sagas.testing.SagaTestHarness`
(a real ledger, SQLite or PostgreSQL; commands recorded instead of produced
and confirmations stored without decoding, so no Kafka client code).
Reported: the process's CPU time from the signal to the first command
(planning) and from there to the end (running), per compensation, as the
median of several rollbacks with [min-max]. The workers' settings that bear
on it are the benchmark's: `BACKOUT_CONCURRENCY=1024`, the worker's garbage
collector thresholds, no guard on the blast radius's size.

Examples:
    python -m bench.cpu                         # SQLite, 10,000 compensations, 3 rollbacks
    python -m bench.cpu --database postgres --instances 20000 --repeat 5
    python -m bench.cpu --workload rollback --instances 2500   # 10,000, confirmed
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import peer_saga, saga
from bench.procs import database, postgres_available
from bench.scenarios import DEFAULT_CONCURRENCY
from bench.services import ROLLED_BACK_TO
from bench.workload import SERVICE_DEPLOYMENTS, payload_of
from consumers.memory import WORKER_GC_THRESHOLDS
from sagas.context import Headers
from sagas.definition import Saga
from sagas.engine import EngineSettings
from sagas.ledger import RollbackRecord, TrackedEvent
from sagas.planner import idempotency_key
from sagas.registry import Compensate
from sagas.testing import RecordingSink, SagaTestHarness, tracked
from schemas.envelope import EventEnvelope
from schemas.headers import IDEMPOTENCY_KEY_HEADER

BATCH = 2_000  # events per tracking batch, as the worker's tracker reads them


@dataclass(frozen=True)
class Measurement:
    """One rollback: CPU seconds (this process, all threads) and wall seconds."""

    compensations: int
    plan_cpu: float  # signal -> first command sent
    run_cpu: float  # first command -> rollback completed
    wall: float  # signal -> rollback completed

    @property
    def total_cpu(self) -> float:
        return self.plan_cpu + self.run_cpu


@dataclass(frozen=True)
class Workload:
    """A saga module and its steps in forward order."""

    saga: Saga
    # (event type, service, command name, confirmation type or None)
    steps: tuple[tuple[str, str, str, str | None], ...]


WORKLOADS = {
    # The peer row's: 2 steps, no confirmations.
    "peer": Workload(peer_saga.peer, peer_saga.STEPS),
    # The rollback rows': 4 steps over 3 services, each confirmed.
    "rollback": Workload(saga.bench, saga.STEPS),
}
DEPLOYMENT = "bench-orders-2.0"


class _Services(RecordingSink):
    """Records commands and the process CPU time when the first one was sent;
    with confirmations, queues each command's confirming event (built before
    the rollback, so that building it is not counted) for `confirm`."""

    def __init__(self, confirmations: dict[str, TrackedEvent]) -> None:
        super().__init__()
        self.first_cpu: float | None = None
        self.confirmations = confirmations
        self.pending: list[TrackedEvent] = []
        self.arrived = asyncio.Event()

    async def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> None:
        if self.first_cpu is None:
            self.first_cpu = time.process_time()
        await super().send(topic, value, key, headers)
        if self.confirmations:
            idempotency = dict(headers)[IDEMPOTENCY_KEY_HEADER].decode()
            self.pending.append(self.confirmations[idempotency])
            self.arrived.set()

    async def confirm(self, harness: SagaTestHarness) -> None:
        """Track the queued confirmations in batches, as the worker's tracker would."""
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            await asyncio.sleep(0)  # the rest of the round's commands
            batch, self.pending = self.pending, []
            for start in range(0, len(batch), BATCH):
                await harness.emit_tracked(*batch[start : start + BATCH])


def _instance(
    harness: SagaTestHarness, workload: Workload, n: int
) -> tuple[list[EventEnvelope], dict[str, TrackedEvent]]:
    """Saga instance `n`'s events, and the confirmation of each one's compensation by key."""
    order_id = f"order-{n}"
    events: list[EventEnvelope] = []
    confirmations: dict[str, TrackedEvent] = {}
    for event_type, service, _, confirm in workload.steps:
        event = harness.envelope(
            event_type,
            payload_of(event_type, n, order_id),
            deployment_id=DEPLOYMENT if service == "orders" else SERVICE_DEPLOYMENTS[service],
            service=service,
            correlation_id=order_id,
            causation_id=events[-1].event_id if events else None,
            key=order_id,
        )
        events.append(event)
        if confirm is None:
            continue
        resolution = harness.registry.resolve(event_type, 1)
        assert isinstance(resolution, Compensate)
        key = idempotency_key(event.event_id, resolution.step.name)
        confirmations[key] = tracked(
            harness.envelope(
                confirm,
                {"order_id": order_id},
                deployment_id=SERVICE_DEPLOYMENTS.get(service, ROLLED_BACK_TO),
                service=service,
                correlation_id=order_id,
                causation_id=key,
                key=order_id,
            )
        )
    return events, confirmations


async def measure(url: str, instances: int, workload: Workload = WORKLOADS["peer"]) -> Measurement:
    """Track `instances` saga instances into the ledger at `url`, then roll them back once."""
    settings = EngineSettings(
        poll_interval=0.5, concurrency=DEFAULT_CONCURRENCY, max_compensations=100_000_000
    )
    confirmations: dict[str, TrackedEvent] = {}
    services = _Services(confirmations)
    harness = SagaTestHarness(workload.saga, settings=settings, database_url=url)
    harness.commands = services  # before its engine is made, at `async with`
    async with harness:
        envelopes = []
        for n in range(instances):
            events, confirming = _instance(harness, workload, n)
            envelopes += events
            confirmations.update(confirming)
        for start in range(0, len(envelopes), BATCH):
            await harness.emit(*envelopes[start : start + BATCH])
        expected = len(envelopes)
        del envelopes
        gc.collect()
        confirming_task = asyncio.create_task(services.confirm(harness))
        try:
            cpu, wall = time.process_time(), time.perf_counter()
            record = await _roll_back(harness)
            cpu_end, wall_end = time.process_time(), time.perf_counter()
        finally:
            confirming_task.cancel()
            await asyncio.gather(confirming_task, return_exceptions=True)
        if record.state != "completed" or len(services.sent) != expected:
            raise RuntimeError(
                f"the rollback ended {record.state} with {len(services.sent)} of "
                f"{expected} commands sent: {record.error}"
            )
        assert services.first_cpu is not None
        return Measurement(
            compensations=expected,
            plan_cpu=services.first_cpu - cpu,
            run_cpu=cpu_end - services.first_cpu,
            wall=wall_end - wall,
        )


async def _roll_back(harness: SagaTestHarness) -> RollbackRecord:
    """Roll the deployment back and wait for its run to end, in real time.

    Not `harness.rollback()`'s settling, which moves the fake clock on
    whenever the run only waits: here it waits for confirmations that
    arrive in real time (`_Services.confirm`), and on a busy machine the
    clock moved past their deadlines (seen: 1,988 of 10,000 compensations
    failed after retries). With the clock still, no deadline passes.
    """
    record = await harness.rollback(DEPLOYMENT, settle=False)
    while record.rollback_id in harness.engine.running():
        record = await harness.engine.wait(record.rollback_id)
    return record


def _us(seconds: list[float], count: int) -> str:
    """Median [min-max] of `seconds`, in microseconds per one of `count`."""
    each = [s / count * 1e6 for s in seconds]
    return f"{statistics.median(each):.1f} [{min(each):.1f}-{max(each):.1f}] µs"


def report(kind: str, workload: str, results: list[Measurement]) -> str:
    """The lines printed for one database."""
    count = results[0].compensations
    walls = [r.wall for r in results]
    return "\n".join(
        [
            f"{kind}, {workload} workload, {count:,} compensations, {len(results)} rollback(s), "
            f"CPU per compensation, median [min-max]:",
            f"  total    {_us([r.total_cpu for r in results], count)}",
            f"  planning {_us([r.plan_cpu for r in results], count)}  (signal -> first command)",
            f"  running  {_us([r.run_cpu for r in results], count)}  (first command -> end)",
            f"  wall     {statistics.median(walls):.3f} [{min(walls):.3f}-{max(walls):.3f}] s",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cpu",
        description="CPU time per compensation of Backout's engine, in process (no broker).",
    )
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="peer",
        help="peer: 2 steps, no confirmations (default); rollback: 4 steps, each confirmed",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=5_000,
        help="saga instances (default 5,000: 10,000 compensations of the peer workload)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rollbacks measured (default 3)")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    if "postgres" in kinds and (problem := await postgres_available()) is not None:
        print(f"PostgreSQL is not reachable on 127.0.0.1:5432: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="backout-bench-cpu-") as folder:
        for kind in kinds:
            results = []
            for _ in range(args.repeat):
                async with database(kind, Path(folder)) as db:
                    results.append(await measure(db.url, args.instances, WORKLOADS[args.workload]))
            label = "SQLite" if kind == "sqlite" else "PostgreSQL"
            print(report(label, args.workload, results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    gc.set_threshold(*WORKER_GC_THRESHOLDS)
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
