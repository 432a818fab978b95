"""Fixtures of the reliability suite: chaos stacks of real `backout worker` processes.

A `ChaosStack` is a set of names of its own (app id = consumer groups, topic
prefix), a ledger, and one or more workers sharing them (the same
`BACKOUT_APP_ID`: one consumer group). The saga is `tests.support.chaos`; the
services are a `ServiceDouble` in the test process. Every test prints the
figures it reached; they are repeated at the end of the session.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sagas.ledger import CompensationRecord, Ledger
from tests.support import chaos
from tests.support.kafka import ensure_topics
from tests.support.names import unique_name
from tests.support.waiting import wait_for
from tests.support.worker import WorkerProcess

FIGURES: list[str] = []
TERMINAL = {"planned", "completed", "completed_with_warnings", "failed", "rejected"}


def report(line: str) -> None:
    """Print a figure now and in the session summary."""
    print(line)
    FIGURES.append(line)


@dataclass
class ChaosStack:
    """Workers of one app id on one ledger, and the names they work with."""

    bootstrap: str
    tag: str
    database_url: str
    log_dir: Path
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """Prefix of the stack's service topics (`<prefix><service>.events`)."""
        return f"{self.tag}."

    @property
    def worker(self) -> WorkerProcess:
        """The first worker."""
        return self.workers[0]

    @property
    def signals_topic(self) -> str:
        """`<prefix>backout.rollbacks`."""
        return f"{self.env['BACKOUT_TOPIC_PREFIX']}rollbacks"

    @property
    def tracker_group(self) -> str:
        """The tracker's consumer group."""
        return f"{self.tag}-tracker"

    @property
    def event_topics(self) -> list[str]:
        """The tracked topics."""
        return [chaos.events_topic(s, self.prefix) for s in chaos.SERVICES]

    def add_worker(self) -> WorkerProcess:
        """Another worker with the same settings (own HTTP port and log)."""
        env = {k: v for k, v in self.env.items() if k != "BACKOUT_WEB_PORT"}
        worker = WorkerProcess(env, log_path=self.log_dir / f"{self.tag}-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def services(self, *, apply_delay: float = 0.0) -> chaos.ServiceDouble:
        """A double of the five services on this stack's topics."""
        return chaos.ServiceDouble(self.bootstrap, self.prefix, apply_delay=apply_delay)

    def producer(self) -> chaos.EventProducer:
        """A producer of this stack's events and signals."""
        return chaos.EventProducer(self.bootstrap, self.prefix)

    # -- reading the API of whichever worker runs ---------------------------------------

    def _live(self) -> WorkerProcess:
        for worker in self.workers:
            if worker.running:
                return worker
        raise AssertionError("no worker of the stack is running")

    async def fetch(self, path: str) -> tuple[int, Any]:
        """GET `path` from a running worker: (status, body); OSError while it is down."""
        return await self._live().fetch(path)

    async def counts(self, rollback_id: str) -> dict[str, Any] | None:
        """The rollback's status counts (no compensation list), None if not known (yet)."""
        status, body = await self.fetch(f"/api/rollbacks/{rollback_id}?limit=1")
        return body if status == 200 else None

    async def wait_state(
        self, rollback_id: str, states: set[str], *, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Wait until a running worker's API shows the rollback in one of `states`."""

        async def reached() -> dict[str, Any] | None:
            body = await self.counts(rollback_id)
            return body if body is not None and body["state"] in states else None

        return await wait_for(
            reached,
            timeout=timeout,
            interval=0.1,
            message=f"rollback {rollback_id} in {sorted(states)}",
            ignore=(OSError, AssertionError),
        )

    async def wait_tracked(
        self, deployment_id: str, by_type: dict[str, int], *, timeout: float = 60.0
    ) -> None:
        """Wait until GET /api/deployments shows `deployment_id` with exactly `by_type`."""

        async def tracked() -> bool:
            status, body = await self.fetch("/api/deployments")
            if status != 200:
                return False
            for summary in body:
                if summary["deployment_id"] == deployment_id:
                    return bool(summary["by_type"] == by_type)
            return False

        await wait_for(
            tracked,
            timeout=timeout,
            interval=0.1,
            message=f"{deployment_id} tracked as {by_type}",
            ignore=(OSError, AssertionError),
        )

    async def wait_stored(
        self, placed: list[tuple[str, int, int, str]], *, timeout: float = 60.0
    ) -> dict[str, tuple[str, int, int]]:
        """Wait until the ledger holds every produced (topic, partition, offset, event_id).

        `wait_tracked` watches one deployment; the other services' events of
        the same instances are on other partitions, tracked in other batches,
        maybe a moment later. Returns where the ledger says each event came
        from; on timeout, the missing events and the group's committed offsets
        for their partitions (an offset past a missing event means it was lost).
        """
        missing: list[tuple[str, int, int]] = []

        async def all_stored() -> dict[str, tuple[str, int, int]] | None:
            nonlocal missing
            ledger = await Ledger.open(self.database_url, migrate_schema=False)
            try:
                stored = await ledger.events_by_id(e for _, _, _, e in placed)
            finally:
                await ledger.close()
            missing = sorted((t, p, o) for t, p, o, e in placed if e not in stored)
            if missing:
                return None
            return {e: (s.topic, s.partition, s.offset) for e, s in stored.items()}

        try:
            return await wait_for(
                all_stored, timeout=timeout, interval=0.2, message="every produced event stored"
            )
        except AssertionError as exc:  # the deadline passed
            slots = sorted({(t, p) for t, p, _ in missing})
            committed = await chaos.committed_offsets(self.bootstrap, self.tracker_group, slots)
            raise AssertionError(
                f"{len(missing)} produced events not in the ledger after {timeout:g}s: "
                f"{missing}; the tracker group's committed offsets: {committed}"
            ) from exc

    async def compensations(self, rollback_id: str) -> list[CompensationRecord]:
        """The rollback's compensations as the ledger holds them (read directly)."""
        ledger = await Ledger.open(self.database_url, migrate_schema=False)
        try:
            return await ledger.plan_items(rollback_id)
        finally:
            await ledger.close()


def stack_env(bootstrap: str, tag: str, database_url: str, **extra: str) -> dict[str, str]:
    """The settings of a chaos stack's workers."""
    return {
        "BACKOUT_BROKER": f"kafka://{bootstrap}",
        "BACKOUT_DATABASE_URL": database_url,
        "BACKOUT_SAGAS": "tests.support.chaos",
        "BACKOUT_APP_ID": tag,
        "BACKOUT_TOPIC_PREFIX": f"{tag}.backout.",
        "BACKOUT_EVENT_TOPICS": ",".join(chaos.events_topic(s, f"{tag}.") for s in chaos.SERVICES),
        "BACKOUT_SESSION_TIMEOUT": "2",
        "BACKOUT_HEARTBEAT_INTERVAL": "0.5",
        "BACKOUT_COMMIT_INTERVAL": "0.5",
        "BACKOUT_POLL_INTERVAL": "0.2",
        "BACKOUT_CONCURRENCY": "32",
        chaos.TOPIC_PREFIX_ENV: f"{tag}.",
        **extra,
    }


MakeStack = Callable[..., Awaitable[ChaosStack]]


@pytest.fixture
async def make_chaos_stack(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[MakeStack]:
    """Factory: `await make_chaos_stack(ledger_url, workers=1, bootstrap=None, **env)`.

    Topics are created first; workers are built but not started. Every
    worker still running at the end is stopped.
    """
    stacks: list[ChaosStack] = []

    async def make(
        database_url: str, *, workers: int = 1, bootstrap: str | None = None, **extra: str
    ) -> ChaosStack:
        broker = bootstrap or kafka_bootstrap
        tag = unique_name("chaos")
        env = stack_env(broker, tag, database_url, **extra)
        stack = ChaosStack(broker, tag, database_url, tmp_path, env)
        await ensure_topics(
            broker,
            [
                *stack.event_topics,
                *(chaos.command_topic(s, stack.prefix) for s in chaos.SERVICES),
            ],
        )
        for _ in range(workers):
            stack.add_worker()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await asyncio.gather(*(asyncio.to_thread(w.stop_sync) for w in stack.workers))


@pytest.fixture
def pg_admin_for(request: pytest.FixtureRequest) -> Callable[[str], str | None]:
    """`pg_admin_for(ledger_url)`: the PostgreSQL admin DSN for a PostgreSQL ledger, else None."""

    def admin(database_url: str) -> str | None:
        if not database_url.startswith("postgresql"):
            return None
        dsn: str = request.getfixturevalue("postgres_admin_url")
        return dsn

    return admin


# --------------------------------------------------------------------- worker logs

_ASSIGNED = re.compile(
    r"Setting newly assigned partitions\s*\n(?P<table>(?:[+|].*\n)+?)"
    r"\+-[-+]*\+ for group (?P<group>\S+)"
)


def assigned_partitions(log: str, topic: str, group: str) -> set[int] | None:
    """The partitions of `topic` in the last assignment of `group` a worker logged
    (None: never assigned).

    faust and aiokafka log an assignment as a table of `| topic | {0-3} |`
    rows that ends with `for group <group>`.
    """
    last: set[int] | None = None
    for match in _ASSIGNED.finditer(log):
        if match.group("group") != group:
            continue
        found: set[int] = set()
        for row in match.group("table").splitlines():
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            if len(cells) == 2 and cells[0] == topic:
                found = _partition_set(cells[1])
        last = found
    return last


def _partition_set(text: str) -> set[int]:
    result: set[int] = set()
    for part in text.strip("{} ").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-")
            result.update(range(int(low), int(high) + 1))
        else:
            result.add(int(part))
    return result


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus series in `/metrics` text (matching the given labels)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        head, _, rest = series.partition("{")
        if head != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures the reliability tests reached."""
    if not FIGURES:
        return
    terminalreporter.write_sep("-", "reliability figures")
    for line in FIGURES:
        terminalreporter.write_line(line)
