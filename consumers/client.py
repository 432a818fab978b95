"""Talking to a Backout deployment over Kafka: publish signals, read status.

Used by the CLI and the HTTP API, so every publisher signs and serialises
signals the same way (canonical JSON, HMAC when `BACKOUT_SIGNAL_KEY` is set).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry.trace import SpanKind

from consumers.settings import Settings
from sagas import tracing
from schemas.signal import SIGNATURE_HEADER, RollbackSignal, sign
from schemas.status import RollbackState, RollbackStatus


def signal_record(
    signal: RollbackSignal, signal_key: str | None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a signal record as Backout's publishers send it."""
    value = signal.canonical_bytes()
    headers = tracing.current_headers()
    if signal_key:
        headers.append((SIGNATURE_HEADER, sign(value, signal_key).encode()))
    return signal.record_key.encode(), value, headers


async def publish_signal(settings: Settings, signal: RollbackSignal) -> None:
    """Publish a rollback signal on the signals topic (signed when a key is set)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", request_timeout_ms=15_000
    )
    await producer.start()
    try:
        with tracing.tracer().start_as_current_span(
            tracing.span_send(settings.signals_topic),
            kind=SpanKind.PRODUCER,
            attributes={
                tracing.MESSAGING_SYSTEM: "kafka",
                tracing.MESSAGING_DESTINATION: settings.signals_topic,
                tracing.MESSAGING_OPERATION_TYPE: "send",
                tracing.MESSAGING_KEY: signal.record_key,
                tracing.ROLLBACK_ID: signal.signal_id,
            },
        ):
            key, value, headers = signal_record(signal, settings.signal_key)
            await producer.send_and_wait(settings.signals_topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def _status_consumer(settings: Settings) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    partitions = consumer.partitions_for_topic(settings.status_topic)
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(settings.status_topic) or set()
    consumer.assign([TopicPartition(settings.status_topic, p) for p in sorted(partitions)])
    await consumer.seek_to_beginning()
    return consumer


def _parse(value: bytes | None) -> RollbackStatus | None:
    if not value:
        return None
    try:
        return RollbackStatus.model_validate(json.loads(value))
    except ValueError:
        return None


async def read_statuses(
    settings: Settings, *, idle_seconds: float = 1.5
) -> dict[str, RollbackStatus]:
    """The latest status of every rollback on the status topic.

    Reads until the topic has been quiet for `idle_seconds`: the development
    broker's end offsets cannot be trusted (BROKER.md).
    """
    consumer = await _status_consumer(settings)
    latest: dict[str, RollbackStatus] = {}
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_seconds:
            batch = await consumer.getmany(timeout_ms=200)
            if not batch:
                continue
            quiet_since = time.monotonic()
            for records in batch.values():
                for record in records:
                    status = _parse(record.value)
                    if status is not None:
                        latest[status.rollback_id] = status
    finally:
        await consumer.stop()
    return latest


async def follow_status(
    settings: Settings,
    rollback_id: str,
    *,
    timeout: float,
    on_status: Callable[[RollbackStatus], None] | None = None,
) -> RollbackStatus | None:
    """Follow one rollback's status records until it reaches an end state.

    Returns:
        The final status, or None when `timeout` passed first (the last
        status seen is passed to `on_status` as it arrives).
    """
    consumer = await _status_consumer(settings)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    status = _parse(record.value)
                    if status is None or status.rollback_id != rollback_id:
                        continue
                    if on_status is not None:
                        on_status(status)
                    if status.state.is_terminal and status.state != RollbackState.PLANNED:
                        return status
                    if status.state == RollbackState.PLANNED and status.dry_run:
                        return status
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return None
