"""A harness for saga authors: test a saga module without Kafka.

Example:
    >>> async def test_refund_is_sent():                       # doctest: +SKIP
    ...     async with SagaTestHarness(checkout) as harness:
    ...         placed = harness.envelope("OrderPlaced", {"order_id": "o1"},
    ...                                   deployment_id="orders-1.1")
    ...         await harness.emit(placed)
    ...         rollback = await harness.rollback("orders-1.1")
    ...         assert rollback.state == "completed"
    ...         assert harness.sent[0].json()["command"] == "CancelOrder"

The ledger is a real SQLite file in a temporary folder (the same code as in
production), the clock is a `FakeClock` that `settle()` advances, and every
command `ctx.send` produces is recorded in `harness.sent`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from sagas.clock import FakeClock
from sagas.context import Headers, SentCommand
from sagas.definition import Saga
from sagas.engine import EngineSettings, RollbackEngine
from sagas.executor import FailureSink
from sagas.ledger import (
    CompensationRecord,
    Ledger,
    PlanRecord,
    RollbackRecord,
    TrackedEvent,
    TrackResult,
    tracked_from_envelope,
)
from sagas.registry import SagaRegistry
from schemas.envelope import EventEnvelope
from schemas.headers import IDEMPOTENCY_KEY_HEADER
from schemas.signal import RollbackSignal
from schemas.status import RollbackStatus


class RecordingSink:
    """A `CommandSink` that keeps every command; can be told to fail."""

    def __init__(self) -> None:
        self.sent: list[SentCommand] = []
        self.failures_left = 0

    async def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> None:
        """Record the command (or raise, while `failures_left` > 0)."""
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("simulated broker outage")
        self.sent.append(SentCommand(topic, value, key, list(headers)))


class RecordingStatus:
    """A `StatusSink` keeping every status record."""

    def __init__(self) -> None:
        self.records: list[RollbackStatus] = []

    async def publish(self, status: RollbackStatus) -> None:
        """Keep the record."""
        self.records.append(status)

    def states(self, rollback_id: str) -> list[str]:
        """The sequence of distinct states published for a rollback."""
        states: list[str] = []
        for record in self.records:
            if record.rollback_id == rollback_id and (not states or states[-1] != record.state):
                states.append(record.state)
        return states


class RecordingFailures(FailureSink):
    """A `FailureSink` keeping (rollback id, key, error) of exhausted compensations."""

    def __init__(self) -> None:
        self.failed: list[tuple[str, str, str]] = []

    async def compensation_failed(
        self, rollback_id: str, item: PlanRecord, event: TrackedEvent, error: str
    ) -> None:
        """Keep it."""
        self.failed.append((rollback_id, item.idempotency_key, error))


def tracked(envelope: EventEnvelope, **position: Any) -> TrackedEvent:
    """The ledger form of an envelope (topic/partition/offset optional)."""
    return tracked_from_envelope(envelope, **position)


class SagaTestHarness:
    """Feed envelopes, issue rollbacks, inspect what compensations sent.

    Args:
        sagas: the sagas (or one registry) under test.
        settings: engine settings (guard, concurrency, quarantine).
        database_url: a ledger URL; a temporary SQLite file by default.
    """

    def __init__(
        self,
        *sagas: Saga | SagaRegistry,
        settings: EngineSettings | None = None,
        database_url: str | None = None,
    ) -> None:
        registries = [s for s in sagas if isinstance(s, SagaRegistry)]
        self.registry = registries[0] if registries else SagaRegistry()
        for saga in sagas:
            if isinstance(saga, Saga):
                self.registry.add(saga)
        self.clock = FakeClock()
        self.commands = RecordingSink()
        self.statuses = RecordingStatus()
        self.failures = RecordingFailures()
        self.settings = settings or EngineSettings(poll_interval=0.5)
        self._database_url = database_url
        self._folder: Path | None = None
        self._ledger: Ledger | None = None
        self._engine: RollbackEngine | None = None
        self._sequence = 0

    async def __aenter__(self) -> SagaTestHarness:
        url = self._database_url
        if url is None:
            self._folder = Path(tempfile.mkdtemp(prefix="backout-harness-"))
            url = f"sqlite+aiosqlite:///{self._folder / 'ledger.db'}"
        self._ledger = await Ledger.open(url)
        self._engine = self.new_engine()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._engine is not None:
            await self._engine.stop()
        if self._ledger is not None:
            await self._ledger.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    @property
    def ledger(self) -> Ledger:
        """The ledger (inside `async with` only)."""
        assert self._ledger is not None, "use the harness inside `async with`"
        return self._ledger

    @property
    def engine(self) -> RollbackEngine:
        """The engine (inside `async with` only)."""
        assert self._engine is not None, "use the harness inside `async with`"
        return self._engine

    def new_engine(self) -> RollbackEngine:
        """A fresh engine on the same ledger: what a restarted worker gets."""
        return RollbackEngine(
            self.ledger,
            self.registry,
            commands=self.commands,
            status=self.statuses,
            failures=self.failures,
            clock=self.clock,
            settings=self.settings,
        )

    async def crash_and_restart(self) -> RollbackEngine:
        """Kill every run and resume from the ledger, as a restarted worker would.

        Runs stop between two ledger transactions (a killed process loses
        none half-way either: the database rolls it back); handlers in flight
        are cancelled, so their outcome is lost and they run again, same key.
        """
        await self.engine.stop()
        self._engine = self.new_engine()
        await self._engine.resume()
        return self._engine

    @property
    def sent(self) -> list[SentCommand]:
        """Every command sent so far, in order."""
        return self.commands.sent

    def envelope(
        self,
        event_type: str,
        payload: dict[str, Any],
        *,
        deployment_id: str = "svc-1.0",
        service: str | None = None,
        service_version: str | None = None,
        schema_version: int = 1,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        key: str | None = None,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> EventEnvelope:
        """Build an envelope; times increase by one second per envelope by default."""
        self._sequence += 1
        service_name = service or deployment_id.split("-")[0]
        return EventEnvelope(
            event_id=event_id or str(uuid.uuid4()),
            event_type=event_type,
            schema_version=schema_version,
            service=service_name,
            service_version=service_version or "1.0",
            deployment_id=deployment_id,
            occurred_at=occurred_at or self.clock.now() + timedelta(seconds=self._sequence),
            correlation_id=correlation_id,
            causation_id=causation_id,
            key=key,
            payload=payload,
        )

    async def emit(self, *envelopes: EventEnvelope) -> TrackResult:
        """Track envelopes as the worker would (confirmations and late events included)."""
        return await self.emit_tracked(*(tracked(e) for e in envelopes))

    async def emit_tracked(self, *events: TrackedEvent) -> TrackResult:
        """`emit` for events already in their ledger form (`tracked(envelope)`)."""
        result = await self.ledger.track(
            list(events), now=self.clock.now(), confirmed_by=self.engine.instance_id
        )
        await self.engine.on_tracked(result)
        return result

    async def confirm(self, command: SentCommand, event_type: str, **payload: Any) -> TrackResult:
        """Emit the confirmation a service would send for `command`."""
        key = command.header(IDEMPOTENCY_KEY_HEADER)
        return await self.emit(
            self.envelope(event_type, dict(payload), deployment_id="confirmer-1", causation_id=key)
        )

    def signal(self, deployment_id: str | None = None, **fields: Any) -> RollbackSignal:
        """A rollback signal for `deployment_id`, issued well after every emitted event."""
        values: dict[str, Any] = {
            "signal_id": fields.pop("signal_id", None) or str(uuid.uuid4()),
            "deployment_id": deployment_id,
            "issued_at": self.clock.now() + timedelta(days=1),
        }
        values.update(fields)
        return RollbackSignal.model_validate(values)

    async def rollback(
        self, deployment_id: str | None = None, *, settle: bool = True, **fields: Any
    ) -> RollbackRecord:
        """Issue a rollback and (by default) let it run to its end."""
        record = await self.engine.handle_signal(self.signal(deployment_id, **fields))
        if settle:
            return await self.settle(record.rollback_id)
        return record

    async def settle(self, rollback_id: str, *, max_fake_seconds: float = 86_400) -> RollbackRecord:
        """Let a rollback's run end, advancing the fake clock through backoffs and timeouts."""
        budget = max_fake_seconds
        while True:
            task = self.engine._tasks.get(rollback_id)
            if task is None or task.done():
                return await self.ledger.require_rollback(rollback_id)
            done, _ = await asyncio.wait({task}, timeout=0.02)
            if done:
                continue
            run = self.engine._runs.get(rollback_id)
            if run is None or not run.idle:
                # A handler or a ledger write is still going: time only moves
                # when the run has nothing left to do but wait for it.
                continue
            deadline = self.clock.next_deadline()
            if deadline is None:
                continue
            step = max((deadline - self.clock.now()).total_seconds(), 0.0)
            if budget - step < 0:
                raise TimeoutError(f"rollback {rollback_id} still running after the time budget")
            budget -= step
            await self.clock.advance(step)

    async def compensations(self, rollback_id: str) -> list[CompensationRecord]:
        """The rollback's compensations in plan order, with their states."""
        return await self.ledger.plan_items(rollback_id)

    def keys_sent(self, topics: Iterable[str] | None = None) -> list[str]:
        """Idempotency keys of the commands sent (optionally only to `topics`)."""
        wanted = set(topics) if topics is not None else None
        return [
            str(c.header(IDEMPOTENCY_KEY_HEADER))
            for c in self.sent
            if wanted is None or c.topic in wanted
        ]
