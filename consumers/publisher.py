"""Producing to Kafka: commands, status records, dead letters, signals."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from sagas.context import Headers
from sagas.ledger import Ledger, PlanRecord, TrackedEvent, envelope_fields
from sagas.tracing import current_headers
from schemas.dlq import DeadLetter
from schemas.headers import COMPENSATES_HEADER, IDEMPOTENCY_KEY_HEADER, ROLLBACK_ID_HEADER
from schemas.status import RollbackStatus

log = logging.getLogger(__name__)


class KafkaPublisher:
    """One aiokafka producer shared by everything the worker sends.

    acks=all and no idempotent producer: the development broker has none, and
    every consumer of what we send dedupes (by idempotency key, event id or
    rollback id) anyway.
    """

    def __init__(self, bootstrap_servers: str, *, client_id: str = "backout") -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            acks="all",
            linger_ms=5,
            max_batch_size=256 * 1024,
            max_request_size=4 * 1024 * 1024,
            request_timeout_ms=30_000,
        )
        self._started = False

    async def start(self) -> None:
        """Connect to the broker."""
        await self._producer.start()
        self._started = True

    async def stop(self) -> None:
        """Flush and disconnect."""
        if self._started:
            await self._producer.stop()
            self._started = False

    async def ping(self, timeout: float = 2.0) -> None:
        """Raise unless a broker answers a metadata request within `timeout` seconds."""
        if not self._started:
            raise ConnectionError("the producer is not started")
        await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers
    ) -> None:
        """Send one record and wait until the broker has it (the `CommandSink` protocol)."""
        await self._producer.send_and_wait(topic, value=value, key=key, headers=list(headers))

    async def enqueue(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers
    ) -> asyncio.Future[Any]:
        """Hand one record to the producer; the future resolves when the broker has it.

        Records enqueued one after another are sent in that order (per
        partition) and batched together, instead of one round trip each.
        """
        future: asyncio.Future[Any] = await self._producer.send(
            topic, value=value, key=key, headers=list(headers)
        )
        return future

    async def send_json(
        self, topic: str, value: Any, *, key: str | None, headers: Headers | None = None
    ) -> None:
        """Send a JSON value."""
        await self.send(
            topic,
            json.dumps(value, separators=(",", ":"), default=str).encode(),
            key.encode() if key is not None else None,
            headers or [],
        )


class StatusPublisher:
    """Publishes `RollbackStatus` records on the status topic, keyed by rollback id."""

    def __init__(self, publisher: KafkaPublisher, topic: str) -> None:
        self.publisher = publisher
        self.topic = topic

    async def publish(self, status: RollbackStatus) -> None:
        """Send one status record with the current trace context."""
        await self.publisher.send(
            self.topic,
            status.model_dump_json().encode(),
            status.rollback_id.encode(),
            current_headers(),
        )


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record to dead-letter: its bytes and headers, why, and where it came from."""

    value: bytes | None
    key: bytes | None
    headers: Headers
    error: str
    source_topic: str
    source_partition: int
    source_offset: int


def _too_large(letter: DeadLetter, rejected: BadRecord) -> DeadLetter:
    """The metadata-only letter of a record too large to send again."""
    size = len(rejected.value or b"") + len(rejected.key or b"")
    size += sum(len(v) for _, v in rejected.headers)
    return letter.model_copy(
        update={
            "error": f"{letter.error} (the {size}-byte record is too large to keep in the "
            "DLQ: its value is left empty, its key and headers are dropped)"
        }
    )


class DeadLetters:
    """Sends dead letters to the DLQ topic and keeps their metadata in the ledger."""

    def __init__(self, publisher: KafkaPublisher, ledger: Ledger, topic: str) -> None:
        self.publisher = publisher
        self.ledger = ledger
        self.topic = topic

    async def record(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: Headers,
        error: str,
        source_topic: str,
        source_partition: int,
        source_offset: int,
        now: Any,
    ) -> None:
        """Dead-letter one record: original bytes and headers plus `backout-*` headers."""
        await self.record_all(
            [BadRecord(value, key, headers, error, source_topic, source_partition, source_offset)],
            now=now,
        )

    async def record_all(self, records: Sequence[BadRecord], *, now: Any) -> None:
        """Dead-letter records, in order.

        Every record is handed to the producer first and then all are
        awaited, and their ledger copies are written in one transaction:
        a flood of bad records (a broken deployment) costs a batched produce
        and one commit per tracked batch, not a round trip and a commit per
        record. Returns once the broker has every one of them.
        """
        sent: list[tuple[DeadLetter, BadRecord, asyncio.Future[Any]]] = []
        for rejected in records:
            letter = DeadLetter(
                error=rejected.error,
                source_topic=rejected.source_topic,
                source_partition=rejected.source_partition,
                source_offset=rejected.source_offset,
            )
            ours = letter.headers()
            # A record arriving with its own `backout-error`/`backout-source-*`
            # headers would otherwise carry two of each, and readers that take
            # the first would believe the forged ones.
            reserved = {name for name, _ in ours}
            kept = [(name, v) for name, v in rejected.headers if name not in reserved]
            try:
                future = await self.publisher.enqueue(
                    self.topic, rejected.value, rejected.key, [*kept, *ours]
                )
            except MessageSizeTooLargeError:
                # Larger than our producer may send (the broker took it).
                letter = _too_large(letter, rejected)
                future = await self.publisher.enqueue(self.topic, b"", None, letter.headers())
            sent.append((letter, rejected, future))
        results = await asyncio.gather(*(f for _, _, f in sent), return_exceptions=True)
        letters: list[DeadLetter] = []
        for (letter, rejected, _), result in zip(sent, results, strict=True):
            if isinstance(result, MessageSizeTooLargeError):
                # The broker refused it (its own limit may be below ours).
                letter = _too_large(letter, rejected)
                await self.publisher.send(self.topic, b"", None, letter.headers())
            elif isinstance(result, BaseException):
                raise result
            letters.append(letter)
        try:
            await self.ledger.record_dead_letters(letters, now=now)
        except Exception:  # the DLQ topic has them; the ledger copy is for display only
            log.warning("could not copy dead letters into the ledger", exc_info=True)

    async def compensation_failed(
        self, rollback_id: str, item: PlanRecord, event: TrackedEvent, error: str
    ) -> None:
        """An exhausted compensation: its event goes to the DLQ with the reason."""
        from datetime import UTC, datetime

        document = envelope_fields(event)
        document["occurred_at"] = event.occurred_at.isoformat()
        value = json.dumps(document, default=str).encode()
        headers: Headers = [
            (IDEMPOTENCY_KEY_HEADER, item.idempotency_key.encode()),
            (ROLLBACK_ID_HEADER, rollback_id.encode()),
            (COMPENSATES_HEADER, event.event_id.encode()),
        ]
        await self.record(
            value=value,
            key=(event.key or event.correlation_id or "").encode() or None,
            headers=headers,
            error=f"compensation {item.step} of {event.event_type} {event.event_id} "
            f"failed: {error}",
            source_topic=event.topic or "",
            source_partition=event.partition if event.partition is not None else -1,
            source_offset=event.offset if event.offset is not None else -1,
            now=datetime.now(UTC),
        )
