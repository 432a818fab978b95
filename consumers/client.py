"""Talking to a Backout deployment over Kafka: publish signals, read status.

Used by the CLI and the HTTP API, so every publisher signs and serialises
signals the same way (canonical JSON, HMAC when `BACKOUT_SIGNAL_KEY` is set).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer, ConsumerRecord
from opentelemetry.trace import SpanKind

from consumers.settings import Settings
from consumers.topics import open_reader
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


SendRecord = Callable[[str, bytes, bytes, list[tuple[str, bytes]]], Awaitable[None]]


async def send_signal(settings: Settings, signal: RollbackSignal, send: SendRecord) -> None:
    """Send a signal record with `send(topic, value, key, headers)`, in its producer span.

    The record is built inside the span: its headers carry the span's trace
    context, so the worker's processing links to the publisher.
    """
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
        await send(settings.signals_topic, value, key, headers)


async def publish_signal(settings: Settings, signal: RollbackSignal) -> None:
    """Publish a rollback signal on the signals topic (signed when a key is set)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", request_timeout_ms=15_000
    )

    async def send(topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> None:
        await producer.send_and_wait(topic, value, key=key, headers=headers)

    try:
        await producer.start()
        await send_signal(settings, signal, send)
    finally:
        await producer.stop()


def _parse(value: bytes | None) -> RollbackStatus | None:
    if not value:
        return None
    try:
        return RollbackStatus.model_validate(json.loads(value))
    except ValueError:
        return None


async def read_topic(
    settings: Settings, topic: str, *, idle_seconds: float = 1.0, max_seconds: float = 15.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` up to about now.

    The development broker's end offsets cannot be trusted (BROKER.md), so
    reading stops once the topic has been quiet for `idle_seconds`, or has
    reached records written after the read began (a live worker keeps
    writing), or after `max_seconds`.
    """
    consumer = await open_reader(settings.bootstrap_servers, [topic])
    found: list[ConsumerRecord[bytes, bytes]] = []
    started_ms = time.time() * 1000
    started = time.monotonic()
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_seconds:
            if time.monotonic() - started > max_seconds:
                break
            batch = await consumer.getmany(timeout_ms=200)
            if not batch:
                continue
            quiet_since = time.monotonic()
            for records in batch.values():
                found.extend(records)
            if any(r.timestamp >= started_ms for records in batch.values() for r in records):
                # Whatever else is in flight was written after we began.
                idle_seconds = min(idle_seconds, 0.3)
    finally:
        await consumer.stop()
    return found


async def read_statuses(settings: Settings) -> dict[str, RollbackStatus]:
    """The latest status of every rollback on the status topic."""
    latest: dict[str, RollbackStatus] = {}
    records = await read_topic(settings, settings.status_topic)
    for record in sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset)):
        status = _parse(record.value)
        if status is not None:
            latest[status.rollback_id] = status
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
    consumer = await open_reader(settings.bootstrap_servers, [settings.status_topic])
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
