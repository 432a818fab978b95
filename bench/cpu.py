"""`python -m bench.cpu`: the CPU time Backout's own code spends per compensation.

The table of `python -m bench` times whole processes against a broker, and a
run's figures move by ±10% with the machine's load; a change worth 3% of a
compensation's CPU is lost in that. This measures the engine alone, in this
process, with nothing else running: the peer row's workload (`bench/peer_saga.py`,
N instances x 2 steps, no confirmations), tracked into a fresh ledger, then
one rollback through `sagas.testing.SagaTestHarness` (a real ledger, SQLite
or PostgreSQL; commands recorded instead of produced, so no Kafka client).
Reported: the process's CPU time from the signal to the first command
(planning) and from there to the end (running), per compensation, as the
median of several rollbacks with [min-max]. The workers' settings that bear
on it are the benchmark's: `BACKOUT_CONCURRENCY=1024`, the worker's garbage
collector thresholds, no guard on the blast radius's size.

Examples:
    python -m bench.cpu                         # SQLite, 10,000 compensations, 3 rollbacks
    python -m bench.cpu --database postgres --instances 20000 --repeat 5
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

from bench.peer_saga import peer
from bench.procs import database, postgres_available
from sagas.context import Headers
from sagas.engine import EngineSettings
from sagas.testing import RecordingSink, SagaTestHarness
from schemas.envelope import EventEnvelope

# The benchmark's workers run with these (bench/scenarios.py, consumers/worker.py).
CONCURRENCY = 1024
GC_THRESHOLDS = (50_000, 20, 100)
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


class _FirstCommand(RecordingSink):
    """Records commands, and the process CPU time when the first one was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.first_cpu: float | None = None

    async def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> None:
        if self.first_cpu is None:
            self.first_cpu = time.process_time()
        await super().send(topic, value, key, headers)


def _instance(harness: SagaTestHarness, n: int) -> list[EventEnvelope]:
    """One saga instance of the peer workload: an order placed, its payment captured."""
    order_id = f"order-{n}"
    placed = harness.envelope(
        "PeerOrderPlaced",
        {"order_id": order_id, "customer_id": f"customer-{n % 97}", "total_cents": 1000 + n},
        deployment_id="orders-2.0",
        correlation_id=order_id,
    )
    captured = harness.envelope(
        "PeerPaymentCaptured",
        {"order_id": order_id, "payment_id": f"payment-{n}", "amount_cents": 1000 + n},
        deployment_id="payments-1.4",
        correlation_id=order_id,
        causation_id=placed.event_id,
    )
    return [placed, captured]


async def measure(url: str, instances: int) -> Measurement:
    """Track `instances` x 2 events into the ledger at `url`, then roll them back once."""
    settings = EngineSettings(
        poll_interval=0.5, concurrency=CONCURRENCY, max_compensations=100_000_000
    )
    sink = _FirstCommand()
    harness = SagaTestHarness(peer, settings=settings, database_url=url)
    harness.commands = sink  # before its engine is made, at `async with`
    async with harness:
        envelopes = [e for n in range(instances) for e in _instance(harness, n)]
        for start in range(0, len(envelopes), BATCH):
            await harness.emit(*envelopes[start : start + BATCH])
        del envelopes
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        record = await harness.rollback("orders-2.0")
        cpu_end, wall_end = time.process_time(), time.perf_counter()
        if record.state != "completed" or len(sink.sent) != 2 * instances:
            raise RuntimeError(
                f"the rollback ended {record.state} with {len(sink.sent)} of "
                f"{2 * instances} commands sent: {record.error}"
            )
        assert sink.first_cpu is not None
        return Measurement(
            compensations=2 * instances,
            plan_cpu=sink.first_cpu - cpu,
            run_cpu=cpu_end - sink.first_cpu,
            wall=wall_end - wall,
        )


def _us(seconds: list[float], count: int) -> str:
    """Median [min-max] of `seconds`, in microseconds per one of `count`."""
    each = [s / count * 1e6 for s in seconds]
    return f"{statistics.median(each):.1f} [{min(each):.1f}-{max(each):.1f}] µs"


def report(kind: str, results: list[Measurement]) -> str:
    """The lines printed for one database."""
    count = results[0].compensations
    walls = [r.wall for r in results]
    return "\n".join(
        [
            f"{kind}, {count:,} compensations, {len(results)} rollback(s), "
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
        "--instances",
        type=int,
        default=5_000,
        help="saga instances of 2 steps (default 5,000: 10,000 compensations)",
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
                    results.append(await measure(db.url, args.instances))
            label = "SQLite" if kind == "sqlite" else "PostgreSQL"
            print(report(label, results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    gc.set_threshold(*GC_THRESHOLDS)
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
