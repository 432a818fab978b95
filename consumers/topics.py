"""Reading records off topics from their first offset, without a consumer group.

A reader is a group-less consumer assigned every partition of its topics and
positioned at the earliest offset. Group-less on purpose: there is nothing to
join (the development broker holds a group join for half a session timeout,
BROKER.md), nothing is committed, and every reader sees every record. How long
to read is the caller's business: the development broker's end offsets cannot
be trusted (BROKER.md), so readers stop on what they found, a quiet spell or a
deadline, never on "the end of the topic".

This module needs nothing but aiokafka: the DBOS peer benchmark
(`bench/peer_dbos.py`) imports it from a virtualenv without faust or pydantic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

# What makes a consumer a reader; callers may add settings (fetch sizes) or
# override `fetch_max_wait_ms`, which bounds how long an empty fetch waits.
READER_SETTINGS: dict[str, Any] = {
    "group_id": None,
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "fetch_max_wait_ms": 100,
}


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, or [] while the cluster does not know the topic.

    A started consumer's metadata may predate a topic created a moment ago,
    so an unknown topic is looked up once more before it counts as missing.
    """
    found = consumer.partitions_for_topic(topic)
    if not found:
        await consumer._client.force_metadata_update()
        found = consumer.partitions_for_topic(topic)
    return [TopicPartition(topic, p) for p in sorted(found or ())]


def missing_topics(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> list[str]:
    """Those of `topics` a reader got no partition of (they did not exist)."""
    assigned = {tp.topic for tp in consumer.assignment()}
    return [topic for topic in topics if topic not in assigned]


async def open_reader(
    bootstrap: str,
    topics: Iterable[str],
    *,
    partitions: int | None = None,
    wait: float = 0.0,
    **settings: Any,
) -> AIOKafkaConsumer:
    """A started reader of `topics`; the caller stops it.

    Args:
        bootstrap: Kafka `host:port`.
        topics: what to read.
        partitions: assign partitions 0 to `partitions - 1` of every topic
            without asking the cluster (for topics created with a known count,
            possibly not created yet); None assigns the partitions the
            cluster reports.
        wait: how long to keep asking the cluster for topics it does not
            know yet (polled every 0.1 s). Topics still unknown then are left
            out: see `missing_topics`.
        settings: further `AIOKafkaConsumer` settings (over `READER_SETTINGS`).
    """
    names = list(topics)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **{**READER_SETTINGS, **settings})
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()  # a failed start leaves its client open
        raise
    try:
        if partitions is not None:
            assigned = [TopicPartition(t, p) for t in names for p in range(partitions)]
        else:
            assigned = await _known_partitions(consumer, names, wait)
        consumer.assign(assigned)
        await consumer.seek_to_beginning()
    except BaseException:
        await consumer.stop()
        raise
    return consumer


@contextlib.asynccontextmanager
async def reading(
    bootstrap: str,
    topics: Iterable[str],
    *,
    partitions: int | None = None,
    wait: float = 0.0,
    **settings: Any,
) -> AsyncIterator[AIOKafkaConsumer]:
    """`open_reader` as a context: the reader is stopped on the way out."""
    consumer = await open_reader(bootstrap, topics, partitions=partitions, wait=wait, **settings)
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _known_partitions(
    consumer: AIOKafkaConsumer, topics: list[str], wait: float
) -> list[TopicPartition]:
    deadline = time.monotonic() + wait
    found: dict[str, list[TopicPartition]] = {}
    while True:
        for topic in topics:
            if topic not in found and (partitions := await partitions_of(consumer, topic)):
                found[topic] = partitions
        if len(found) == len(topics) or time.monotonic() >= deadline:
            return [tp for topic in topics for tp in found.get(topic, [])]
        # A topic a worker creates on first use appears within moments.
        await asyncio.sleep(0.1)
