"""Chaos tooling of the reliability suite: a saga, its services, and ways to hurt a worker.

- `flow`, the "chaos" saga (`BACKOUT_SAGAS=tests.support.chaos`): five
  services, each step confirmed by the service (so a parent is undone only
  after its children's undo really landed). Command topics are
  `$CHAOS_TOPIC_PREFIX<service>.commands`; the confirmation timeout is
  `$CHAOS_CONFIRM_TIMEOUT` seconds (read when the worker imports the module).
- `build_instances`: saga instances of 3-5 causally linked events (a random
  tree rooted at a booking of the deployment to roll back), each knowing the
  keys a rollback must apply and in which order.
- `ServiceDouble`: every service at once, as a test double that applies a
  command at most once per `backout-idempotency-key`, counts raw deliveries,
  records the order it applied keys per saga instance, and confirms every
  delivery (the same confirmation event again for a duplicate, as
  `examples.shop.services` do).
- Outages: `postgres_outage` (the database refuses connections and its
  sessions are ended), `sqlite_outage` (another connection holds the write
  lock), and `committed_offsets` of a consumer group.

Nothing here sleeps and hopes: waits are on conditions, with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from sagas import CompensationContext, RetryPolicy, Saga
from sagas.planner import idempotency_key
from schemas.headers import IDEMPOTENCY_KEY_HEADER, ROLLBACK_ID_HEADER
from schemas.signal import RollbackSignal

# ---------------------------------------------------------------------------- the saga

TOPIC_PREFIX_ENV = "CHAOS_TOPIC_PREFIX"
CONFIRM_TIMEOUT_ENV = "CHAOS_CONFIRM_TIMEOUT"
# Long by default: a confirmation delayed by a kill must not look lost (that
# would re-send the command and blur the count of what crashes redo).
CONFIRM_TIMEOUT = float(os.environ.get(CONFIRM_TIMEOUT_ENV) or 120.0)

flow = Saga("chaos")


@dataclass(frozen=True, slots=True)
class Kind:
    """One step of a chaos saga instance: the event, its undo command, its confirmation."""

    service: str
    event_type: str
    command: str
    confirmation: str

    @property
    def step(self) -> str:
        """The step's name (part of every idempotency key)."""
        return f"{flow.name}.undo_{self.event_type.lower()}"


# Forward order of an instance: a booking first, then what it set off.
KINDS = (
    Kind("bookings", "Booked", "CancelBooking", "BookingCancelled"),
    Kind("payments", "Charged", "Refund", "Refunded"),
    Kind("stock", "Reserved", "Release", "Released"),
    Kind("shipping", "Shipped", "Recall", "Recalled"),
    Kind("notify", "Notified", "Retract", "Retracted"),
)
SERVICES = tuple(kind.service for kind in KINDS)
VIEWED = "Viewed"  # read-only: in the blast radius, nothing to undo


def command_topic(service: str, prefix: str | None = None) -> str:
    """`<prefix><service>.commands` (prefix defaults to `$CHAOS_TOPIC_PREFIX`)."""
    if prefix is None:
        prefix = os.environ.get(TOPIC_PREFIX_ENV, "chaos.")
    return f"{prefix}{service}.commands"


def events_topic(service: str, prefix: str) -> str:
    """`<prefix><service>.events`: tracked; the service's confirmations go there too."""
    return f"{prefix}{service}.events"


def _declare(kind: Kind) -> None:
    async def handler(event: dict[str, Any], ctx: CompensationContext) -> None:
        await ctx.send(
            command_topic(kind.service),
            {
                "command": kind.command,
                "order_id": event["order_id"],
                "instance": ctx.envelope.correlation_id,
            },
            key=str(event["order_id"]),
        )

    handler.__name__ = handler.__qualname__ = kind.step.split(".", 1)[1]
    flow.compensate(
        kind.event_type,
        confirm=kind.confirmation,
        confirm_timeout=CONFIRM_TIMEOUT,
        retry=RetryPolicy(max_attempts=20, initial_delay=0.2, max_delay=2.0),
    )(handler)


for _kind in KINDS:
    _declare(_kind)
flow.ignore(VIEWED)
del _kind

# ------------------------------------------------------------------------- the data


@dataclass
class Instance:
    """One saga instance (correlation id = order id) and what undoing it means.

    Attributes:
        events: (service, envelope) in emission (forward) order.
        keys: idempotency keys of its compensations, in forward order; a
            rollback must apply them in exactly the reverse order (children
            before parents, then reverse step order within the instance).
        kinds: key → step kind.
    """

    order_id: str
    deployment_id: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    kinds: dict[str, Kind] = field(default_factory=dict)

    @property
    def undo_order(self) -> list[str]:
        """The order in which the services must apply this instance's keys."""
        return list(reversed(self.keys))


def _envelope(
    event_type: str,
    *,
    service: str,
    deployment_id: str,
    order_id: str,
    occurred_at: datetime,
    causation_id: str | None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "service": service,
        "service_version": deployment_id.rsplit("-", 1)[-1],
        "deployment_id": deployment_id,
        "occurred_at": occurred_at.isoformat(),
        "correlation_id": order_id,
        "key": order_id,
        "payload": {"order_id": order_id},
    }
    if causation_id is not None:
        document["causation_id"] = causation_id
    return document


def deployments(tag: str) -> dict[str, str]:
    """A fresh deployment id per service (`<service>-<tag>-1`)."""
    return {service: f"{service}-{tag}-1" for service in SERVICES}


def build_instances(
    rng: random.Random,
    count: int,
    *,
    deployment_ids: dict[str, str],
    booking_deployment: str | None = None,
    min_compensations: int = 0,
    steps: tuple[int, int] = (3, 5),
    views: int = 2,
) -> list[Instance]:
    """`count` saga instances with at least `min_compensations` compensations in all.

    Each instance is a booking (stamped with `booking_deployment`, the one a
    test rolls back) and 2-4 more events of other services, each caused by a
    random earlier event of the instance (a chain, a fan-out, or between),
    plus up to `views` read-only `Viewed` events of the booking deployment.
    Times increase within an instance, so its forward order is its emission order.
    """
    booking = booking_deployment or deployment_ids["bookings"]
    sizes = [rng.randint(*steps) for _ in range(count)]
    while sum(sizes) < min_compensations:
        small = [i for i, n in enumerate(sizes) if n < len(KINDS)]
        if not small:
            raise ValueError(f"{count} instances cannot hold {min_compensations} compensations")
        sizes[rng.choice(small)] += 1
    start = datetime.now(UTC) - timedelta(minutes=5)
    instances = []
    for index, size in enumerate(sizes):
        order_id = f"o{index:04d}-{uuid.uuid4().hex[:10]}"
        item = Instance(order_id=order_id, deployment_id=booking)
        at = start + timedelta(milliseconds=10 * index)
        ids: list[str] = []
        for position, kind in enumerate(KINDS[:size]):
            deployment = booking if position == 0 else deployment_ids[kind.service]
            cause = ids[rng.randrange(len(ids))] if ids else None
            document = _envelope(
                kind.event_type,
                service=kind.service,
                deployment_id=deployment,
                order_id=order_id,
                occurred_at=at + timedelta(microseconds=position),
                causation_id=cause,
            )
            ids.append(document["event_id"])
            item.events.append((kind.service, document))
            key = idempotency_key(document["event_id"], kind.step)
            item.keys.append(key)
            item.kinds[key] = kind
        for extra in range(rng.randint(0, views)):
            document = _envelope(
                VIEWED,
                service="bookings",
                deployment_id=booking,
                order_id=order_id,
                occurred_at=at + timedelta(microseconds=size + extra),
                causation_id=ids[0],
            )
            item.events.append(("bookings", document))
        instances.append(item)
    return instances


def expected_keys(instances: Iterable[Instance]) -> dict[str, Instance]:
    """Every key a rollback of `instances` must apply → its instance."""
    return {key: item for item in instances for key in item.keys}


def type_counts(instances: Iterable[Instance], deployment_id: str) -> dict[str, int]:
    """`by_type` of `deployment_id` in GET /api/deployments once all is tracked."""
    counts: Counter[str] = Counter()
    for item in instances:
        for _service, document in item.events:
            if document["deployment_id"] == deployment_id:
                counts[f"{document['event_type']} v{document['schema_version']}"] += 1
    return dict(counts)


# ----------------------------------------------------------------------- Kafka helpers


class EventProducer:
    """Produces instances' events (keyed by order id) and rollback signals."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.prefix = prefix
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=2, request_timeout_ms=15_000
        )

    async def __aenter__(self) -> EventProducer:
        await self._producer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._producer.stop()

    async def events(
        self, instances: Iterable[Instance], *, pace: float = 0.0, batch: int = 50
    ) -> list[tuple[str, int, int, str]]:
        """Produce every event, in order; returns (topic, partition, offset, event_id).

        `pace` seconds are waited after every `batch` records, to stretch the
        production over time (a worker can then be hurt while it tracks).
        """
        placed: list[tuple[str, int, int, str]] = []
        pending: list[tuple[asyncio.Future[Any], str, str]] = []
        for item in instances:
            for service, document in item.events:
                topic = events_topic(service, self.prefix)
                future = await self._producer.send(
                    topic, json.dumps(document).encode(), key=item.order_id.encode()
                )
                pending.append((future, topic, document["event_id"]))
                if len(pending) >= batch:
                    placed += await _landed(pending)
                    pending = []
                    if pace:
                        await asyncio.sleep(pace)
        placed += await _landed(pending)
        return placed

    async def signal(
        self,
        topic: str,
        deployment_id: str,
        *,
        signal_id: str | None = None,
        partition: int | None = None,
        dry_run: bool = False,
    ) -> str:
        """Publish a rollback signal (unsigned, canonical JSON); returns its id."""
        signal = RollbackSignal(
            signal_id=signal_id or str(uuid.uuid4()),
            deployment_id=deployment_id,
            reason="reliability suite",
            requested_by="tests.reliability",
            force=True,
            dry_run=dry_run,
            issued_at=datetime.now(UTC),
        )
        await self._producer.send_and_wait(
            topic,
            signal.canonical_bytes(),
            key=signal.record_key.encode(),
            partition=partition,
        )
        return signal.signal_id


async def _landed(
    pending: list[tuple[asyncio.Future[Any], str, str]],
) -> list[tuple[str, int, int, str]]:
    results = await asyncio.gather(*(future for future, _, _ in pending))
    return [
        (topic, meta.partition, meta.offset, event_id)
        for meta, (_, topic, event_id) in zip(results, pending, strict=True)
    ]


async def committed_offsets(
    bootstrap: str, group_id: str, partitions: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The committed offset of each (topic, partition) of `group_id` (-1: none)."""
    wanted = [TopicPartition(topic, p) for topic, p in partitions]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5_000)
    await admin.start()
    try:
        # BROKER.md: Tansu drops the connection unless `partitions` is given.
        found = await admin.list_consumer_group_offsets(group_id, partitions=wanted)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in found.items()}


# ----------------------------------------------------------------- the services' double


@dataclass(frozen=True, slots=True)
class Delivery:
    """One command record as the double read it."""

    key: str
    rollback_id: str | None
    instance: str
    topic: str
    created_ms: int  # CreateTime, set by the worker's producer
    read_at: float  # time.time() when the double read it


class ServiceDouble:
    """All five services of the chaos saga, played by the test.

    Applies each idempotency key at most once, counts every raw delivery,
    confirms every delivery on the service's event topic (a deterministic
    confirmation event id per key: duplicates are tracked once), and keeps
    the order in which it applied keys per saga instance.

    Args:
        bootstrap: Kafka `host:port`.
        prefix: topic prefix of the stack (`<prefix><service>.commands`).
        apply_delay: seconds each first application takes (stretches a rollback).
    """

    def __init__(self, bootstrap: str, prefix: str, *, apply_delay: float = 0.0) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.apply_delay = apply_delay
        self.deliveries: Counter[str] = Counter()
        self.log: list[Delivery] = []
        self.applied: dict[str, int] = {}  # key → application sequence number
        self.applied_order: dict[str, list[str]] = {}  # instance → keys in applied order
        self.without_key: int = 0
        self._by_topic = {command_topic(k.service, prefix): k for k in KINDS}
        self._gate = asyncio.Event()
        self._gate.set()
        self._outbox: asyncio.Queue[tuple[Kind, str, str, list[tuple[str, bytes]]]] = (
            asyncio.Queue()
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._error: BaseException | None = None

    async def __aenter__(self) -> ServiceDouble:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    @property
    def command_topics(self) -> list[str]:
        """The topics the double consumes."""
        return list(self._by_topic)

    async def start(self) -> None:
        """Connect and serve in background tasks."""
        from tests.support.kafka import ensure_topics

        await ensure_topics(
            self.bootstrap,
            [*self.command_topics, *(events_topic(s, self.prefix) for s in SERVICES)],
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        await self._consumer.start()
        self._consumer.assign(
            [TopicPartition(topic, p) for topic in self.command_topics for p in range(4)]
        )
        await self._consumer.seek_to_beginning()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=2, request_timeout_ms=15_000
        )
        await self._producer.start()
        self._tasks = [
            asyncio.create_task(self._consume(), name="service double: commands"),
            asyncio.create_task(self._confirm(), name="service double: confirmations"),
        ]

    async def stop(self) -> None:
        """Stop serving; raise what a background task failed with, if anything."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        self._consumer = self._producer = None
        self.check()

    def check(self) -> None:
        """Raise if a background task failed."""
        if self._error is not None:
            raise AssertionError(f"service double failed: {self._error!r}") from self._error

    def hold(self) -> None:
        """Apply commands but keep their confirmations until `release`."""
        self._gate.clear()

    def release(self) -> None:
        """Send held and future confirmations."""
        self._gate.set()

    def forget_held(self) -> int:
        """Drop the confirmations not sent yet (they died with a broker); returns how many."""
        dropped = 0
        while not self._outbox.empty():
            self._outbox.get_nowait()
            dropped += 1
        return dropped

    @property
    def duplicates(self) -> int:
        """Raw deliveries beyond the first of each key."""
        return sum(self.deliveries.values()) - len(self.deliveries)

    def of_rollbacks(self, rollback_ids: set[str]) -> list[Delivery]:
        """Deliveries of commands of these rollbacks."""
        return [d for d in self.log if d.rollback_id in rollback_ids]

    async def wait_applied(self, keys: Iterable[str], timeout: float = 60.0) -> None:
        """Wait until every key in `keys` was applied."""
        wanted = set(keys)
        deadline = time.monotonic() + timeout
        while not wanted <= self.applied.keys():
            self.check()
            if time.monotonic() > deadline:
                missing = sorted(wanted - self.applied.keys())
                raise AssertionError(
                    f"{len(missing)} of {len(wanted)} keys not applied within {timeout:g}s: "
                    f"{missing[:5]}"
                )
            await asyncio.sleep(0.05)

    async def _consume(self) -> None:
        assert self._consumer is not None
        try:
            while True:
                batch = await self._consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        await self._handle(record)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced by check() / stop()
            self._error = exc

    async def _handle(self, record: Any) -> None:
        headers = [(str(n), bytes(v or b"")) for n, v in (record.headers or ())]
        found = dict(headers)
        key = found.get(IDEMPOTENCY_KEY_HEADER, b"").decode()
        if not key:
            self.without_key += 1
            return
        command = json.loads(record.value)
        instance = str(command["instance"])
        kind = self._by_topic[record.topic]
        rollback = found.get(ROLLBACK_ID_HEADER)
        self.deliveries[key] += 1
        self.log.append(
            Delivery(
                key=key,
                rollback_id=rollback.decode() if rollback is not None else None,
                instance=instance,
                topic=record.topic,
                created_ms=record.timestamp,
                read_at=time.time(),
            )
        )
        if key not in self.applied:
            if self.apply_delay:
                await asyncio.sleep(self.apply_delay)
            self.applied[key] = len(self.applied)
            self.applied_order.setdefault(instance, []).append(key)
        trace = [(n, v) for n, v in headers if n in ("traceparent", "tracestate")]
        self._outbox.put_nowait((kind, key, instance, trace))

    async def _confirm(self) -> None:
        try:
            while True:
                kind, key, instance, trace = await self._outbox.get()
                await self._gate.wait()
                assert self._producer is not None
                document = {
                    # Deterministic: the same confirmation for every delivery of a key.
                    "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"chaos-confirm/{key}")),
                    "event_type": kind.confirmation,
                    "schema_version": 1,
                    "service": kind.service,
                    "service_version": "1",
                    "deployment_id": f"{kind.service}-svc-1",
                    "occurred_at": datetime.now(UTC).isoformat(),
                    "correlation_id": instance,
                    "causation_id": key,
                    "key": instance,
                    "payload": {"order_id": instance, "undone": kind.command},
                }
                await self._producer.send_and_wait(
                    events_topic(kind.service, self.prefix),
                    json.dumps(document).encode(),
                    key=instance.encode(),
                    headers=trace,
                )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = exc


# ---------------------------------------------------------------------------- outages


async def _pg_admin(admin_dsn: str) -> Any:
    import asyncpg

    return await asyncpg.connect(admin_dsn, timeout=10)


@contextlib.asynccontextmanager
async def postgres_outage(admin_dsn: str, database: str) -> AsyncIterator[None]:
    """The ledger database is down: it refuses connections and its sessions end.

    `ALTER DATABASE ... ALLOW_CONNECTIONS false` (also for superusers), then
    `pg_terminate_backend` of every session on it; connections are allowed
    again on exit.
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", database):
        raise ValueError(f"unexpected database name {database!r}")
    conn = await _pg_admin(admin_dsn)
    try:
        await conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        yield
    finally:
        await conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await conn.close()


class _WriteLock(threading.Thread):
    """Holds SQLite's write lock from another connection until told to let go."""

    def __init__(self, path: str) -> None:
        super().__init__(name="sqlite write lock", daemon=True)
        self.path = path
        self.locked = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            try:
                # WAL mode: readers go on, every writer waits (up to its busy
                # timeout, then "database is locked") - how a SQLite ledger fails.
                conn.execute("BEGIN EXCLUSIVE")
                self.locked.set()
                self.release.wait()
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except BaseException as exc:
            self.error = exc
            self.locked.set()


@contextlib.asynccontextmanager
async def sqlite_outage(path: str) -> AsyncIterator[None]:
    """The SQLite ledger is locked by another connection (`BEGIN EXCLUSIVE`).

    chmod cannot stand in: the suite runs as root, which ignores file modes.
    """
    lock = _WriteLock(path)
    lock.start()
    await asyncio.to_thread(lock.locked.wait)
    if lock.error is not None:
        raise AssertionError(f"could not lock {path}: {lock.error!r}")
    try:
        yield
    finally:
        lock.release.set()
        await asyncio.to_thread(lock.join)


@contextlib.asynccontextmanager
async def ledger_outage(database_url: str, admin_dsn: str | None) -> AsyncIterator[str]:
    """`postgres_outage` or `sqlite_outage` for a ledger URL; yields what was done."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database
        async with sqlite_outage(url.database):
            yield "SQLite write lock held by another connection (BEGIN EXCLUSIVE)"
        return
    assert admin_dsn is not None
    assert url.database
    async with postgres_outage(admin_dsn, url.database):
        yield "PostgreSQL database refusing connections, sessions terminated"


# ---------------------------------------------------------------------------- figures


@dataclass
class Stopwatch:
    """Elapsed seconds since creation."""

    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        """Seconds since start."""
        return time.monotonic() - self.started


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean (0 for nothing)."""
    items = list(values)
    return sum(items) / len(items) if items else 0.0


def seed_from_env(name: str = "CHAOS_SEED") -> int:
    """A random seed, or `$CHAOS_SEED` to replay a run."""
    value = os.environ.get(name)
    return int(value) if value else random.SystemRandom().randrange(2**32)
