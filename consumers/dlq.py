"""`backout dlq list|replay`: read dead letters back, and send them home again.

Replaying is for records that were refused for a reason since fixed (a saga
module now handles their type, a producer bug was fixed upstream...): the
original bytes and headers go back to their source topic; the tracker
dedupes by `event_id`, so replaying twice is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from consumers.client import read_topic
from consumers.settings import Settings
from schemas.dlq import DeadLetter

BACKOUT_HEADER_PREFIX = "backout-"


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One record of the DLQ topic."""

    partition: int
    offset: int
    letter: DeadLetter
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def original_headers(self) -> list[tuple[str, bytes]]:
        """The record's own headers, without what Backout added."""
        return [(n, v) for n, v in self.headers if not n.startswith(BACKOUT_HEADER_PREFIX)]


async def list_dead_letters(
    settings: Settings, *, source_topic: str | None = None, match: str | None = None
) -> list[DeadLetterRecord]:
    """Dead letters, oldest first, optionally only from one topic or with `match` in the error."""
    records = await read_topic(settings, settings.dlq_topic)
    letters = []
    for record in sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset)):
        headers = [(n, v or b"") for n, v in record.headers or ()]
        try:
            letter = DeadLetter.from_headers(headers)
        except ValueError:
            continue
        if source_topic is not None and letter.source_topic != source_topic:
            continue
        if match is not None and match.lower() not in letter.error.lower():
            continue
        letters.append(
            DeadLetterRecord(
                record.partition, record.offset, letter, record.key, record.value, headers
            )
        )
    return letters


async def replay(settings: Settings, letters: list[DeadLetterRecord]) -> int:
    """Send each dead letter's original record back to its source topic."""
    replayable = [d for d in letters if d.letter.source_topic]
    if not replayable:
        return 0
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    try:
        await producer.start()
        for dead in replayable:
            await producer.send_and_wait(
                dead.letter.source_topic, dead.value, key=dead.key, headers=dead.original_headers
            )
    finally:
        await producer.stop()
    return len(replayable)
