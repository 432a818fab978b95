"""Kafka helpers for tests that drive a real broker: envelopes, a fake service, topic reads.

Everything here follows BROKER.md: nothing relies on end offsets or on
"latest"; readers start at the earliest offset and wait for what they expect,
with a deadline, instead of waiting for the topic to "end".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import RecordMetadata

from consumers.topics import missing_topics, open_reader
from schemas.headers import COMPENSATES_HEADER, IDEMPOTENCY_KEY_HEADER, ROLLBACK_ID_HEADER

PARTITIONS = 4  # what the broker gives an auto-created topic; ours match it


def envelope(
    event_type: str,
    *,
    service: str,
    deployment_id: str,
    payload: Mapping[str, Any],
    schema_version: int = 1,
    service_version: str = "1.0",
    correlation_id: str | None = None,
    causation_id: str | None = None,
    key: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    """An event envelope (DESIGN §2.1) as a JSON-ready dict, with a fresh `event_id`."""
    document: dict[str, Any] = {
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": schema_version,
        "service": service,
        "service_version": service_version,
        "deployment_id": deployment_id,
        "occurred_at": (occurred_at or datetime.now(UTC)).isoformat(),
        "payload": dict(payload),
    }
    for name, value in (
        ("correlation_id", correlation_id),
        ("causation_id", causation_id),
        ("key", key),
    ):
        if value is not None:
            document[name] = value
    return document


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record, decoded enough for assertions."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> str | None:
        """The first header called `name`, decoded, or None."""
        for header_name, value in self.headers:
            if header_name == name:
                return value.decode("utf-8", "replace")
        return None

    def json(self) -> Any:
        """The value decoded as JSON."""
        assert self.value is not None, f"{self.topic}[{self.partition}]@{self.offset} is null"
        return json.loads(self.value)

    @property
    def idempotency_key(self) -> str | None:
        """`backout-idempotency-key` of a compensation command."""
        return self.header(IDEMPOTENCY_KEY_HEADER)

    @property
    def rollback_id(self) -> str | None:
        """`backout-rollback-id` of a compensation command."""
        return self.header(ROLLBACK_ID_HEADER)

    @property
    def compensates(self) -> str | None:
        """`backout-compensates` (the undone event's id) of a compensation command."""
        return self.header(COMPENSATES_HEADER)

    def __str__(self) -> str:
        value = self.value[:200] if self.value is not None else None
        names = [name for name, _ in self.headers]
        return f"{self.topic}[{self.partition}]@{self.offset} {value!r} headers={names}"


async def ensure_topics(bootstrap: str, names: Iterable[str]) -> None:
    """Create topics that do not exist yet (so readers can assign their partitions)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = sorted(set(names) - existing)
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(n, num_partitions=PARTITIONS, replication_factor=1) for n in missing]
                )
    finally:
        await admin.close()


class Producer:
    """An aiokafka producer that sends JSON (or raw bytes) and waits for each ack.

    Example:
        >>> async with Producer(bootstrap) as producer:  # doctest: +SKIP
        ...     await producer.send("orders.events", envelope(...), key="o1")
    """

    def __init__(self, bootstrap: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")

    async def __aenter__(self) -> Producer:
        await self._producer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._producer.stop()

    async def send(
        self,
        topic: str,
        value: Mapping[str, Any] | bytes | None,
        *,
        key: str | bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> RecordMetadata:
        """Send one record (a dict is JSON-encoded) and return where it landed."""
        raw = json.dumps(value).encode() if isinstance(value, Mapping) else value
        return await self._producer.send_and_wait(
            topic,
            raw,
            key=key.encode() if isinstance(key, str) else key,
            headers=list(headers),
        )

    async def event(self, topic: str, document: Mapping[str, Any]) -> RecordMetadata:
        """Send an envelope keyed as the contract says: `key`, else `correlation_id`."""
        key = document.get("key") or document.get("correlation_id")
        return await self.send(topic, document, key=key)


async def _assigned_consumer(bootstrap: str, topics: Iterable[str]) -> AIOKafkaConsumer:
    """A reader (`consumers.topics`) of every partition of `topics`, created if need be."""
    topics = list(topics)
    await ensure_topics(bootstrap, topics)
    consumer = await open_reader(bootstrap, topics)
    missing = missing_topics(consumer, topics)
    if missing:
        await consumer.stop()
        raise AssertionError(f"topics {missing} have no partitions after creating them")
    return consumer


def _record(message: Any) -> Record:
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp=message.timestamp,
        key=message.key,
        value=message.value,
        headers=tuple((str(n), bytes(v or b"")) for n, v in (message.headers or ())),
    )


async def read_topic(
    bootstrap: str,
    topic: str,
    predicate: Callable[[Record], bool] = lambda _r: True,
    *,
    count: int = 1,
    timeout: float = 20.0,
    what: str = "records",
) -> list[Record]:
    """Read `topic` from the beginning until `count` records match `predicate`.

    Returns:
        The matching records in partition-offset order of arrival (at least
        `count`; every match in the batches read so far).

    Raises:
        AssertionError: the deadline passed first; the message shows what matched.
    """
    consumer = await _assigned_consumer(bootstrap, [topic])
    matched: list[Record] = []
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while len(matched) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                shown = "\n  ".join(str(r) for r in matched) or "(none)"
                raise AssertionError(
                    f"{what}: {len(matched)} of {count} expected on {topic!r} after "
                    f"{timeout:g}s ({seen} records read); matched:\n  {shown}"
                )
            batch = await consumer.getmany(timeout_ms=int(min(remaining, 0.2) * 1000) + 1)
            for messages in batch.values():
                for message in messages:
                    seen += 1
                    record = _record(message)
                    if predicate(record):
                        matched.append(record)
    finally:
        await consumer.stop()
    return matched


@dataclass(frozen=True, slots=True)
class Confirmation:
    """How a fake service confirms the commands of one topic."""

    event_type: str  # e.g. "Refunded"
    topic: str  # a tracked events topic
    service: str = "fake"


@dataclass
class CommandCollector:
    """Collects compensation commands and, optionally, answers them like a service would.

    It reads `topics` from the earliest offset (commands sent before it started
    count too) and keeps every record. For topics in `confirmations` it emits,
    once per idempotency key (a service applies a command at most once), an
    envelope of the given type whose `causation_id` is the key, as a real
    service does after applying the command. `hold_confirmations()` lets a
    test keep the "service" from answering until it says so.

    Args:
        bootstrap: Kafka `host:port`.
        topics: command topics to read.
        confirmations: command topic → how to confirm it.
        rollback_ids: answer only commands of these rollbacks (the set can be
            extended while running); None answers every command.
    """

    bootstrap: str
    topics: list[str]
    confirmations: dict[str, Confirmation] = field(default_factory=dict)
    rollback_ids: set[str] | None = None
    records: list[Record] = field(default_factory=list)
    confirmed: set[str] = field(default_factory=set)
    _gate: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _answerer: asyncio.Task[None] | None = None
    _to_answer: asyncio.Queue[Record] = field(default_factory=asyncio.Queue)
    _consumer: AIOKafkaConsumer | None = None
    _producer: Producer | None = None
    _error: BaseException | None = None

    def __post_init__(self) -> None:
        self._gate.set()

    async def __aenter__(self) -> CommandCollector:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start reading (and answering) in a background task."""
        self._consumer = await _assigned_consumer(self.bootstrap, self.topics)
        await ensure_topics(self.bootstrap, {c.topic for c in self.confirmations.values()})
        self._producer = Producer(self.bootstrap)
        await self._producer.__aenter__()
        self._task = asyncio.create_task(self._run(), name="command collector")
        self._answerer = asyncio.create_task(self._answer_loop(), name="fake service")

    async def stop(self) -> None:
        """Stop reading; raise what the background task failed with, if anything."""
        for task in (self._task, self._answerer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.__aexit__()
        if self._error is not None:
            raise AssertionError(f"command collector failed: {self._error!r}") from self._error

    def hold_confirmations(self) -> None:
        """Stop answering until `release_confirmations` (commands are still collected)."""
        self._gate.clear()

    def release_confirmations(self) -> None:
        """Answer held and future commands again."""
        self._gate.set()

    def of(self, rollback_id: str | None = None) -> list[Record]:
        """Commands (of one rollback, when given), in the order they were read."""
        return [r for r in self.records if rollback_id is None or r.rollback_id == rollback_id]

    def by_key(self, rollback_id: str | None = None) -> dict[str, list[Record]]:
        """Commands grouped by idempotency key."""
        grouped: dict[str, list[Record]] = {}
        for record in self.of(rollback_id):
            grouped.setdefault(record.idempotency_key or "", []).append(record)
        return grouped

    async def wait_for_keys(
        self, keys: Iterable[str], *, rollback_id: str | None = None, timeout: float = 20.0
    ) -> dict[str, list[Record]]:
        """Wait until a command for each of `keys` was read; returns `by_key`."""
        wanted = set(keys)
        deadline = time.monotonic() + timeout
        while not wanted <= set(self.by_key(rollback_id)):
            self._raise_if_failed()
            if time.monotonic() > deadline:
                missing = sorted(wanted - set(self.by_key(rollback_id)))
                raise AssertionError(
                    f"no command for {len(missing)} of {len(wanted)} keys within {timeout:g}s "
                    f"(rollback {rollback_id or 'any'}): {missing}"
                )
            await asyncio.sleep(0.02)
        return self.by_key(rollback_id)

    async def wait_for_count(
        self, count: int, *, rollback_id: str | None = None, timeout: float = 20.0
    ) -> list[Record]:
        """Wait until at least `count` commands (of `rollback_id`) were read."""
        deadline = time.monotonic() + timeout
        while len(self.of(rollback_id)) < count:
            self._raise_if_failed()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.of(rollback_id))} of {count} commands "
                    f"(rollback {rollback_id or 'any'}) within {timeout:g}s"
                )
            await asyncio.sleep(0.02)
        return self.of(rollback_id)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise AssertionError(f"command collector failed: {self._error!r}") from self._error

    async def _run(self) -> None:
        assert self._consumer is not None
        try:
            while True:
                batch = await self._consumer.getmany(timeout_ms=200)
                for messages in batch.values():
                    for message in messages:
                        record = _record(message)
                        self.records.append(record)
                        if record.topic in self.confirmations:
                            self._to_answer.put_nowait(record)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced by stop() and the wait_* helpers
            self._error = exc

    async def _answer_loop(self) -> None:
        try:
            while True:
                record = await self._to_answer.get()
                await self._gate.wait()
                await self._answer(record)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = exc

    async def _answer(self, record: Record) -> None:
        confirmation = self.confirmations[record.topic]
        key = record.idempotency_key
        if key is None or key in self.confirmed:
            return
        if self.rollback_ids is not None and record.rollback_id not in self.rollback_ids:
            return
        assert self._producer is not None
        command = record.json()
        # A deterministic event id: were the service asked again, its answer
        # would be the same event (and the ledger tracks an event id once).
        document = envelope(
            confirmation.event_type,
            service=confirmation.service,
            deployment_id=f"{confirmation.service}-1",
            payload={"command": command.get("command"), "order_id": command.get("order_id")},
            causation_id=key,
            correlation_id=record.key.decode() if record.key else None,
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"confirm/{key}")),
        )
        await self._producer.event(confirmation.topic, document)
        self.confirmed.add(key)
