"""The four scenarios: tracking, rollback, memory, peer.

Each scenario starts its own embedded broker; every run gets topics, a
consumer group and a ledger database of its own, so runs do not see each
other's data. Producing the input is never timed.
"""

from __future__ import annotations

import contextlib
import os
import signal as signals
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.peer_saga import SERVICES as PEER_SERVICES
from bench.peer_saga import STEPS as PEER_STEPS
from bench.peer_saga import peer_command_topic
from bench.probe import LedgerProbe
from bench.procs import (
    REPO,
    BenchError,
    Child,
    Database,
    Worker,
    broker,
    child_env,
    cpu_seconds,
    database,
    machine_cpu_seconds,
    peak_rss_mb,
    postgres_available,
    postgres_cpu_seconds,
    run_json,
)
from bench.report import Row
from bench.workload import Workload, create_topics, envelopes, produce
from consumers.broker import EmbeddedBroker
from consumers.client import signal_record
from schemas.signal import RollbackSignal

DBOS_PYTHON = REPO / "bench" / ".venv-dbos" / "bin" / "python"
# The workers' BACKOUT_CONCURRENCY (their own default is 64: see "Concurrency"
# in docs/benchmarks.md).
DEFAULT_CONCURRENCY = 1024


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does."""

    tracking: int
    rollback: tuple[int, ...]
    memory: int
    peer: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            tracking=200_000, rollback=(1_000, 10_000, 100_000), memory=1_000_000, peer=10_000
        )

    @classmethod
    def quick(cls) -> Sizes:
        return cls(tracking=5_000, rollback=(200, 1_000), memory=20_000, peer=200)


@dataclass
class Bench:
    """One invocation of `python -m bench`."""

    sizes: Sizes
    runs: int
    databases: list[str]
    workdir: Path
    # Compensations in flight (BACKOUT_CONCURRENCY); the worker's default is 64.
    concurrency: int = DEFAULT_CONCURRENCY
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))
    rows: list[Row] = field(default_factory=list)

    def _prefix(self, tag: str) -> str:
        return f"{tag}-{uuid.uuid4().hex[:8]}."

    def _worker_settings(
        self, db: Database, workload: Workload, sagas: str = "bench.saga"
    ) -> dict[str, str]:
        return {
            "BACKOUT_DATABASE_URL": db.url,
            "BACKOUT_SAGAS": sagas,
            "BACKOUT_EVENT_TOPICS": ",".join(workload.event_topics),
            "BACKOUT_APP_ID": f"bench-{uuid.uuid4().hex[:10]}",
            "BACKOUT_MAX_COMPENSATIONS": "100000000",
            "BACKOUT_CONCURRENCY": str(self.concurrency),
            "BENCH_TOPIC_PREFIX": workload.prefix,
        }

    def _worker(
        self, bootstrap: str, db: Database, workload: Workload, tag: str, sagas: str = "bench.saga"
    ) -> Worker:
        settings = self._worker_settings(db, workload, sagas)
        settings["BACKOUT_BROKER"] = f"kafka://{bootstrap}"
        return Worker(settings, self.workdir / f"worker-{tag}-{uuid.uuid4().hex[:6]}.log")

    # ---------------------------------------------------------------- tracking

    async def tracking(self) -> None:
        n = self.sizes.tracking
        results: dict[str, tuple[list[float], list[float]]] = {
            kind: ([], []) for kind in self.databases
        }
        with broker(self.workdir) as kafka:
            for run in range(self.runs):
                for kind in self.databases:
                    workload = Workload(self._prefix(f"track{run}"))
                    await create_topics(kafka.bootstrap, workload.event_topics)
                    await produce(kafka.bootstrap, envelopes(workload, n))
                    order = ("worker", "raw") if run % 2 == 0 else ("raw", "worker")
                    for who in order:
                        async with database(kind, self.workdir) as db:
                            if who == "worker":
                                rate = await self._track_with_worker(
                                    kafka.bootstrap, db, workload, n
                                )
                                results[kind][0].append(rate)
                            else:
                                rate = await self._track_raw(kafka.bootstrap, db, workload, n)
                                results[kind][1].append(rate)
                    worker_rate, raw_rate = results[kind][0][-1], results[kind][1][-1]
                    self.log(
                        f"tracking {kind} run {run + 1}/{self.runs}: worker {worker_rate:,.0f} "
                        f"ev/s, raw {raw_rate:,.0f} ev/s ({worker_rate / raw_rate:.2f}x)"
                    )
        for kind in self.databases:
            self.rows.append(
                Row(
                    scenario="tracking",
                    case=f"{_label(kind)}, {n:,} envelopes",
                    metric="events/s into the ledger",
                    unit="ev/s",
                    values=results[kind][0],
                    baseline=results[kind][1],
                    baseline_label="raw consumer + insert",
                    target=0.8,
                    target_label=">= 0.8x raw",
                )
            )

    async def _track_with_worker(
        self, bootstrap: str, db: Database, workload: Workload, n: int
    ) -> float:
        worker = self._worker(bootstrap, db, workload, "track")
        probe = LedgerProbe(db)
        worker.start()
        profiler = self._profiler(worker, f"track-{db.kind}")
        try:
            return await probe.wait_for_events(n, worker, timeout=60 + n / 500)
        finally:
            with contextlib.suppress(Exception):
                if profiler is not None:
                    profiler.stop(timeout=60, how=signals.SIGINT)
            worker.stop()
            await probe.close()

    async def _track_raw(self, bootstrap: str, db: Database, workload: Workload, n: int) -> float:
        raw = Child(
            [
                sys.executable,
                "-m",
                "bench.raw",
                "track",
                "--bootstrap",
                bootstrap,
                "--topics",
                ",".join(workload.event_topics),
                "--url",
                db.url,
                "--events",
                str(n),
                "--batch",
                "2000",
            ],
            child_env({}),
            self.workdir / f"raw-track-{uuid.uuid4().hex[:6]}.log",
        )
        probe = LedgerProbe(db)
        raw.start()
        try:
            return await probe.wait_for_events(n, raw, timeout=60 + n / 500)
        finally:
            raw.stop()
            await probe.close()

    # ---------------------------------------------------------------- rollback

    async def rollback(self) -> None:
        for kind in self.databases:
            per_size: dict[int, list[dict[str, float]]] = {}
            for size in self.sizes.rollback:
                per_size[size] = []
                for run in range(self.runs):
                    # A fresh broker for every run, holding nothing of earlier
                    # runs (it keeps every record in memory). On one shared
                    # broker, the 1,000-event PostgreSQL runs that came after
                    # ~1,000,000 records of SQLite runs took 0.70-0.79 s, the
                    # broker using 70-90 us of CPU per compensation; on a fresh
                    # one, 0.32-0.38 s and 30-50 us.
                    with broker(self.workdir) as kafka:
                        result = await self._rollback_run(kafka, kind, size)
                    per_size[size].append(result)
                    self.log(
                        f"rollback {kind} {size:,} run {run + 1}/{self.runs}: first applied in "
                        f"{result['first_applied_s']:.2f}s, all in {result['applied_s']:.2f}s, "
                        f"confirmed in {result['confirmed_s']:.2f}s"
                        f" ({size / result['applied_s']:,.0f}/s), raw "
                        f"{result['raw_rate']:,.0f}/s; {_cpu_summary(result)}"
                    )
            self._rollback_rows(kind, per_size)

    def _rollback_rows(self, kind: str, per_size: dict[int, list[dict[str, float]]]) -> None:
        label = _label(kind)
        for size, results in per_size.items():
            case = f"{label}, {size:,} events"
            rates = [size / r["applied_s"] for r in results]
            self.rows.append(
                Row(
                    "rollback",
                    case,
                    "compensations/s (signal -> all applied)",
                    "/s",
                    values=rates,
                    baseline=[r["raw_rate"] for r in results],
                    baseline_label="raw read + produce",
                    target=0.2,
                    target_label=">= 0.2x raw",
                )
            )
            for metric, key in (
                # Planning (blast radius, order, plan stored) and one round.
                ("signal -> first compensation applied", "first_applied_s"),
                ("signal -> all applied", "applied_s"),
                ("signal -> all confirmed", "confirmed_s"),
            ):
                self.rows.append(
                    Row(
                        "rollback",
                        case,
                        metric,
                        "s",
                        values=[r[key] for r in results],
                        higher_is_better=False,
                    )
                )
            for name in CPU_MEASURED:
                spent = [r[f"{name}_cpu_us"] for r in results if f"{name}_cpu_us" in r]
                if spent:
                    self.rows.append(
                        Row(
                            "rollback",
                            case,
                            f"{name} CPU per compensation (signal -> end)",
                            "us",
                            values=spent,
                            higher_is_better=False,
                        )
                    )
            trips = [r["round_trip_ms"] for r in results if r["round_trip_ms"] >= 0]
            self.rows.append(
                Row(
                    "rollback",
                    case,
                    "applied -> confirmed (median)",
                    "ms",
                    values=trips,
                    higher_is_better=False,
                    note="" if trips else "every confirmation overtook its own outcome",
                )
            )
        sizes = sorted(per_size)
        if len(sizes) >= 2:
            small, large = sizes[-2], sizes[-1]
            ratios = [
                (b["applied_s"] / large) / (a["applied_s"] / small)
                for a, b in zip(per_size[small], per_size[large], strict=False)
            ]
            self.rows.append(
                Row(
                    "rollback",
                    f"{label}, linearity",
                    f"time/event at {large:,} / at {small:,}",
                    "x",
                    values=ratios,
                    higher_is_better=False,
                    target=1.5,
                    target_label="<= 1.5",
                )
            )

    async def _rollback_run(self, kafka: EmbeddedBroker, kind: str, size: int) -> dict[str, float]:
        bootstrap = kafka.bootstrap
        workload = Workload(self._prefix("undo"))
        await create_topics(bootstrap, workload.event_topics + workload.command_topics)
        await produce(bootstrap, envelopes(workload, size))
        raw = await run_json(
            [
                sys.executable,
                "-m",
                "bench.raw",
                "rollback",
                "--bootstrap",
                bootstrap,
                "--topics",
                ",".join(workload.event_topics),
                "--command-topic",
                f"{workload.prefix}raw.commands",
                "--events",
                str(size),
            ],
            child_env({}),
            self.workdir / f"raw-undo-{uuid.uuid4().hex[:6]}.log",
            timeout=120 + size / 100,
        )
        async with database(kind, self.workdir) as db:
            result = await self.undo(bootstrap, db, workload, size, broker_pid=kafka.pid)
        result["raw_rate"] = raw["events"] / raw["seconds"]
        return result

    async def undo(
        self,
        bootstrap: str,
        db: Database,
        workload: Workload,
        size: int,
        *,
        broker_pid: int | None = None,
        sagas: str = "bench.saga",
        confirmed: bool = True,
    ) -> dict[str, float]:
        """Track `size` events (not timed), then time one rollback of them.

        Also measures the CPU time used from the signal to the rollback's end,
        per compensation, by the worker, the fake services and the broker
        (when `broker_pid` is given), and how busy the whole machine was.
        With `confirmed` False (the peer row's saga declares no
        confirmations) no fake services run and the rollback is done when
        every compensation is applied.
        """
        services = Child(
            [
                sys.executable,
                "-m",
                "bench.services",
                "--bootstrap",
                bootstrap,
                "--prefix",
                workload.prefix,
            ],
            child_env({}),
            self.workdir / f"services-{uuid.uuid4().hex[:6]}.log",
        )
        worker = self._worker(bootstrap, db, workload, "undo", sagas)
        probe = LedgerProbe(db)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        if confirmed:
            services.start()
        worker.start()
        profiler: Child | None = None
        try:
            await worker.wait_ready()
            await probe.wait_for_events(size, worker, timeout=60 + size / 200)
            await producer.start()
            profiler = self._profiler(worker, f"undo-{size}")
            signal = RollbackSignal(
                signal_id=f"bench-{uuid.uuid4().hex[:12]}",
                deployment_id=workload.deployment_id,
                reason="benchmark",
                requested_by="bench",
                force=True,
                issued_at=datetime.now(UTC),
            )
            key, value, headers = signal_record(signal, None)
            pids = {
                "worker": worker.pid,
                "services": services.pid if confirmed else None,
                "broker": broker_pid,
            }
            cpu_before = self._cpu_by_process(pids, db)
            machine_before = machine_cpu_seconds()
            published = datetime.now(UTC)
            await producer.send_and_wait("backout.rollbacks", value, key=key, headers=headers)
            state = await probe.wait_terminal(signal.signal_id, worker, timeout=120 + size / 50)
            cpu_after = self._cpu_by_process(pids, db)
            machine_after = machine_cpu_seconds()
            if confirmed:
                services.check_alive("bench services")
            times = await probe.compensation_times()
            done = "confirmed" if confirmed else "applied"
            if state != "completed" or times["states"].get(done, 0) != size:
                raise BenchError(
                    f"rollback ended {state} with {times['states']} (expected {size:,} {done})"
                )
            applied = (times["last_applied"] - published).total_seconds()
            first = (times["first_applied"] - published).total_seconds()
            trip = times["round_trip_median"]
            result = {
                "first_applied_s": first,
                "applied_s": applied,
                "round_trip_ms": trip * 1000 if trip is not None else -1.0,
                "peak_rss_mb": peak_rss_mb(worker.pid) or 0.0,
                # Busy ÷ total over the rollback, all cores together (1.0 = all busy).
                "machine_busy": (machine_after[0] - machine_before[0])
                / max(machine_after[1] - machine_before[1], 1e-9),
            }
            if confirmed:
                result["confirmed_s"] = (times["last_confirmed"] - published).total_seconds()
            for name in cpu_before:
                before, after = cpu_before[name], cpu_after[name]
                if before is not None and after is not None:
                    result[f"{name}_cpu_us"] = (after - before) / size * 1e6
            return result
        finally:
            # Each step on its own: one failing must not leave a process behind.
            with contextlib.suppress(Exception):
                if profiler is not None:
                    profiler.stop(timeout=60, how=signals.SIGINT)
            worker.stop()
            services.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
            await probe.close()

    @staticmethod
    def _cpu_by_process(pids: dict[str, int | None], db: Database) -> dict[str, float | None]:
        """CPU seconds used so far by each process in `pids`, and by the
        PostgreSQL server when the ledger is there (`database`: every
        connection's, the probe's polls included)."""
        spent = {name: cpu_seconds(pid) for name, pid in pids.items()}
        if db.kind == "postgres":
            spent["database"] = postgres_cpu_seconds()
        return spent

    def _profiler(self, worker: Worker, tag: str) -> Child | None:
        """py-spy on the worker when `$BENCH_PROFILE` names a folder (collapsed stacks)."""
        folder = os.environ.get("BENCH_PROFILE")
        if not folder:
            return None
        py_spy = Path(sys.executable).with_name("py-spy")
        out = Path(folder) / f"{tag}-{uuid.uuid4().hex[:6]}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        profiler = Child(
            [
                str(py_spy),
                "record",
                "--pid",
                str(worker.pid),
                "--format",
                "raw",
                "--rate",
                os.environ.get("BENCH_PROFILE_RATE", "100"),
                "--nonblocking",
                "--threads",
                "--output",
                str(out),
            ],
            child_env({}),
            self.workdir / f"py-spy-{tag}.log",
        )
        profiler.start()
        time.sleep(0.5)  # let it attach before the measured part starts
        self.log(f"profiling the worker into {out}")
        return profiler

    # ------------------------------------------------------------------ memory

    async def memory(self) -> None:
        n = self.sizes.memory
        peaks: list[float] = []
        for run in range(self.runs):
            with broker(self.workdir) as kafka:
                workload = Workload(self._prefix("mem"))
                await create_topics(kafka.bootstrap, workload.event_topics)
                await produce(kafka.bootstrap, envelopes(workload, n))
                async with database("sqlite", self.workdir) as db:
                    worker = self._worker(kafka.bootstrap, db, workload, "mem")
                    probe = LedgerProbe(db)
                    worker.start()
                    try:
                        await probe.wait_for_events(n, worker, timeout=120 + n / 300)
                        peak = peak_rss_mb(worker.pid)
                    finally:
                        worker.stop()
                        await probe.close()
                if peak is None:
                    raise BenchError("could not read the worker's VmHWM from /proc")
                peaks.append(peak)
                self.log(f"memory run {run + 1}/{self.runs}: worker peak RSS {peak:.0f} MB")
        self.rows.append(
            Row(
                "memory",
                f"SQLite, {n:,} events tracked",
                "worker peak RSS (VmHWM)",
                "MB",
                values=peaks,
                higher_is_better=False,
                target=250,
                target_label="<= 250 MB",
            )
        )

    # -------------------------------------------------------------------- peer

    async def peer(self) -> None:
        size = self.sizes.peer
        instances = size // len(PEER_STEPS)
        case = f"{size:,} compensations ({instances:,} instances x {len(PEER_STEPS)} steps)"
        row = Row(
            "peer",
            case,
            "compensations/s vs DBOS workflows",
            "/s",
            baseline_label="DBOS",
            target=50,
            target_label=">= 50x DBOS",
        )
        self.rows.append(row)
        pg_problem = await postgres_available()
        row.baseline_label = f"DBOS on {'PostgreSQL' if pg_problem is None else 'SQLite'}"
        missing = _dbos_missing()
        if missing:
            # Backout's side still runs (it exercises the peer saga); the row
            # has no baseline, so no ratio and no verdict.
            row.note = f"DBOS skipped: {missing}"
            row.baseline_label = ""
            row.target = None
            self.log(f"peer: {row.note}")
        kind = "postgres" if pg_problem is None and "postgres" in self.databases else "sqlite"
        row.case += f", Backout on {_label(kind)}"
        for run in range(self.runs):
            # Who goes first alternates, as in the tracking row.
            order = ("dbos", "backout") if run % 2 == 0 else ("backout", "dbos")
            if missing:
                order = ("backout",)
            rates, details = await self._peer_run(kind, size, order, pg_problem is None)
            row.values.append(rates["backout"])
            dbos = "skipped"
            if "dbos" in rates:
                row.baseline.append(rates["dbos"])
                dbos = f"{rates['dbos']:,.0f}/s"
            self.log(
                f"peer run {run + 1}/{self.runs}: Backout {rates['backout']:,.0f}/s "
                f"({details}), DBOS {dbos}"
            )
        if pg_problem is not None and not missing:
            row.note = f"DBOS on SQLite (PostgreSQL unavailable: {pg_problem})"

    async def _peer_run(
        self, kind: str, size: int, order: tuple[str, ...], pg: bool
    ) -> tuple[dict[str, float], str]:
        """One run of the peer workload by each of `order`, on one fresh broker.

        Returns compensations/s by who ran ("backout", "dbos"), and a line
        on Backout's run for the log.
        """
        rates: dict[str, float] = {}
        details = ""
        with broker(self.workdir) as kafka:
            workload = Workload(self._prefix("peer"))
            commands = [peer_command_topic(s, workload.prefix) for s in PEER_SERVICES]
            await create_topics(kafka.bootstrap, workload.event_topics + commands)
            await produce(kafka.bootstrap, envelopes(workload, size, PEER_STEPS))
            for who in order:
                if who == "dbos":
                    rates[who] = await self._dbos_run(kafka.bootstrap, workload, size, pg)
                    continue
                async with database(kind, self.workdir) as db:
                    result = await self.undo(
                        kafka.bootstrap,
                        db,
                        workload,
                        size,
                        broker_pid=kafka.pid,
                        sagas="bench.peer_saga",
                        confirmed=False,
                    )
                rates[who] = size / result["applied_s"]
                details = (
                    f"first applied in {result['first_applied_s']:.2f}s, all in "
                    f"{result['applied_s']:.2f}s; {_cpu_summary(result)}"
                )
        return rates, details

    async def _dbos_run(self, bootstrap: str, workload: Workload, size: int, pg: bool) -> float:
        import asyncpg

        name = f"bench_dbos_{uuid.uuid4().hex[:10]}"
        if pg:
            url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        else:
            url = f"sqlite:///{self.workdir / name}.sqlite"
        try:
            result = await run_json(
                [
                    str(DBOS_PYTHON),
                    str(REPO / "bench" / "peer_dbos.py"),
                    "--bootstrap",
                    bootstrap,
                    "--topics",
                    ",".join(workload.event_topics),
                    "--prefix",
                    workload.prefix,
                    "--events",
                    str(size),
                    "--database-url",
                    url,
                ],
                child_env({}),
                self.workdir / f"dbos-{uuid.uuid4().hex[:6]}.log",
                timeout=300 + size / 10,
            )
        finally:
            if pg:
                admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await admin.close()
        return float(result["events"]) / float(result["seconds"])


def _dbos_missing() -> str | None:
    """None when the DBOS virtualenv is usable, else why not."""
    if not DBOS_PYTHON.exists():
        return (
            f"no DBOS virtualenv at {DBOS_PYTHON.parent.parent} (create it with "
            "`python3 -m venv bench/.venv-dbos && bench/.venv-dbos/bin/pip install dbos aiokafka`"
            "; dbos pins a croniter that conflicts with faust's, so it has its own venv)"
        )
    import subprocess

    probe = subprocess.run(
        [str(DBOS_PYTHON), "-c", "import dbos, aiokafka"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"dbos is not importable in {DBOS_PYTHON}: {probe.stderr.strip()[-300:]}"
    return None


# Whose CPU time a rollback run reports per compensation ("database": the
# PostgreSQL server's, measured only when the ledger is there).
CPU_MEASURED = ("worker", "services", "broker", "database")


def _label(kind: str) -> str:
    return "SQLite" if kind == "sqlite" else "PostgreSQL"


def _cpu_summary(result: dict[str, float]) -> str:
    """CPU per compensation by process, and how busy the machine was, for the log."""
    spent = ", ".join(
        f"{name} {result[f'{name}_cpu_us']:.0f}"
        for name in CPU_MEASURED
        if f"{name}_cpu_us" in result
    )
    return f"CPU us/compensation: {spent}; machine {result['machine_busy']:.0%} busy"


def summary(values: list[float]) -> dict[str, Any]:
    """median/min/max of a list (for the JSON output)."""
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def run_all(bench: Bench, only: list[str]) -> None:
    """Run the chosen scenarios in a fixed order."""
    started = time.monotonic()
    for name in ("tracking", "rollback", "memory", "peer"):
        if name in only:
            await getattr(bench, name)()
    bench.log(f"benchmark finished in {time.monotonic() - started:.0f}s")


__all__ = ["Bench", "Sizes", "run_all"]
