"""Rollback signals: verify, validate, deduplicate, hand to the engine.

A bad signal never crashes the worker: it gets a `rejected` status with a
clear error and goes to the DLQ. Signals rejected before they could be
trusted (bad signature, bad fields) do not reserve their `signal_id` in the
ledger, so a forger cannot block a legitimate signal by sending its id first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from consumers import metrics
from consumers.publisher import DeadLetters, StatusPublisher
from sagas import tracing
from sagas.clock import Clock
from sagas.engine import RollbackEngine
from schemas.errors import describe_validation_error
from schemas.signal import SIGNATURE_HEADER, RollbackSignal, verify_signature
from schemas.status import RollbackState, RollbackStatus

log = logging.getLogger(__name__)


# Seconds between attempts at a signal while the ledger (or broker) is away.
RETRY_FIRST_DELAY = 0.2
RETRY_MAX_DELAY = 5.0


def is_outage(exc: BaseException) -> bool:
    """True for errors of an unreachable ledger or broker (worth waiting out), not bugs.

    A database that refuses connections, drops them, or stays locked past
    the busy timeout surfaces as a DBAPI error other than the integrity,
    programming, data and not-supported ones, which retrying cannot fix.
    """
    from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
    from sqlalchemy import exc as sa

    if isinstance(exc, sa.IntegrityError | sa.ProgrammingError | sa.DataError):
        return False
    if isinstance(exc, sa.NotSupportedError):
        return False
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError):
        return True
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)  # not e.g. a record too large, which stays too large
    return isinstance(exc, sa.DBAPIError | sa.TimeoutError | OSError | TimeoutError)


class SignalIntake:
    """Processes one raw record of the signals topic."""

    def __init__(
        self,
        engine: RollbackEngine,
        *,
        status: StatusPublisher,
        dead_letters: DeadLetters,
        clock: Clock,
        signal_key: str | None,
    ) -> None:
        self.engine = engine
        self.status = status
        self.dead_letters = dead_letters
        self.clock = clock
        self.signal_key = signal_key

    async def handle(
        self,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None = None,
    ) -> str:
        """Process a signal record; returns the rollback id it concerned."""
        with tracing.tracer().start_as_current_span(
            tracing.span_process(topic),
            context=tracing.context_from_headers(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                tracing.MESSAGING_SYSTEM: "kafka",
                tracing.MESSAGING_DESTINATION: topic,
                tracing.MESSAGING_PARTITION: str(partition),
                tracing.MESSAGING_OFFSET: offset,
                tracing.MESSAGING_OPERATION_TYPE: "process",
            },
        ) as span:
            document = _json_object(value)
            claimed_id = _claimed_id(document) or f"invalid-{topic}-{partition}-{offset}"
            # The root of a rollback's trace is searchable by its id.
            span.set_attribute(tracing.ROLLBACK_ID, claimed_id)
            if self.signal_key:
                signature = next((v for n, v in headers if n == SIGNATURE_HEADER), None)
                problem = verify_signature(value or b"", signature, self.signal_key)
                if problem is not None:
                    await self._untrusted(
                        claimed_id, problem, value, key, headers, topic, partition, offset, document
                    )
                    return claimed_id
            if document is None:
                reason = "signal is not a JSON object" if value else "empty signal record"
                await self._untrusted(
                    claimed_id, reason, value, key, headers, topic, partition, offset, None
                )
                return claimed_id
            try:
                signal = RollbackSignal.model_validate(document)
            except ValidationError as exc:
                reason = describe_validation_error("RollbackSignal", exc)
                await self._untrusted(
                    claimed_id, reason, value, key, headers, topic, partition, offset, document
                )
                return claimed_id
            record = await self.engine.handle_signal(signal, partition=partition)
            metrics.SIGNALS.labels(result=record.state).inc()
            if record.state == RollbackState.REJECTED:
                await self._dead_letter(
                    value, key, headers, record.error or "rejected", topic, partition, offset
                )
            return signal.signal_id

    async def handle_through_outages(
        self,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None = None,
    ) -> str:
        """`handle`, attempted again while the ledger or the broker is unreachable.

        The signals agent acknowledges a record once this returns: were an
        outage error let through, faust would restart the agent past the
        record and the signal would be lost. Handling a signal again is safe:
        a signal already recorded is a duplicate, and a rollback left
        `accepted` or `planning` is planned again by the next reconcile.
        """
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                return await self.handle(
                    value, headers, topic=topic, partition=partition, offset=offset, key=key
                )
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning(
                    "signal %s[%d]@%d not handled (retrying in %.1fs): %s",
                    topic,
                    partition,
                    offset,
                    delay,
                    exc,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)

    async def _untrusted(
        self,
        claimed_id: str,
        reason: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        topic: str,
        partition: int,
        offset: int,
        document: dict[str, Any] | None,
    ) -> None:
        metrics.SIGNALS.labels(result="rejected").inc()
        log.warning("rejected signal %s: %s", claimed_id, reason)
        deployment = document.get("deployment_id") if document else None
        await self.status.publish(
            RollbackStatus(
                rollback_id=claimed_id,
                deployment_id=deployment if isinstance(deployment, str) else None,
                dry_run=bool(document.get("dry_run") is True) if document else False,
                state=RollbackState.REJECTED,
                error=reason,
                updated_at=self.clock.now(),
            )
        )
        await self._dead_letter(value, key, headers, reason, topic, partition, offset)

    async def _dead_letter(
        self,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        reason: str,
        topic: str,
        partition: int,
        offset: int,
    ) -> None:
        await self.dead_letters.record(
            value=value,
            key=key,
            headers=headers,
            error=f"rejected signal: {reason}",
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            now=self.clock.now(),
        )


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        document = json.loads(value)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _claimed_id(document: dict[str, Any] | None) -> str | None:
    if document is None:
        return None
    claimed = document.get("signal_id")
    if isinstance(claimed, str) and 0 < len(claimed) <= 255:
        return claimed
    return None
