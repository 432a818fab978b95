"""A worker runtime for HTTP tests: real ledger, real engine, real producer, no faust.

`consumers.api.build_web_app` needs what `consumers.runtime.Runtime` exposes
once it is ready: `ledger`, `engine`, `publisher`, `settings`, `is_ready` and
`tracker`. Starting a whole faust worker for each HTTP test would add seconds
and nothing the API touches, so `ApiRuntime` builds those same objects.

Also here: a saga whose compensations a test drives step by step, and a
reader of the records on a topic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka.structs import ConsumerRecord

from consumers.publisher import KafkaPublisher
from consumers.settings import Settings
from consumers.topics import missing_topics, open_reader
from sagas import CompensationContext, PermanentError, RetryPolicy, Saga
from sagas.clock import SystemClock
from sagas.engine import EngineSettings, RollbackEngine
from sagas.ledger import Ledger, TrackedEvent
from sagas.registry import SagaRegistry
from sagas.testing import RecordingFailures, RecordingSink, RecordingStatus


@dataclass
class Controls:
    """How the `driven` saga's compensations behave.

    A `Step` event's compensation waits for one `release()` per event;
    a `Broken` event's compensation fails permanently; `Emailed` is irreversible.
    """

    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    started: list[str] = field(default_factory=list)

    def release(self, n: int = 1) -> None:
        """Let `n` waiting compensations finish."""
        for _ in range(n):
            self.gate.release()


def driven_saga(controls: Controls) -> Saga:
    """A saga whose compensations finish when the test says so."""
    saga = Saga("driven")

    @saga.compensate("Step", retry=RetryPolicy(max_attempts=1, timeout=300))
    async def undo_step(event: dict[str, Any], ctx: CompensationContext) -> None:
        controls.started.append(str(event.get("n")))
        await controls.gate.acquire()

    @saga.compensate("Broken", retry=RetryPolicy(max_attempts=1, initial_delay=0))
    async def undo_broken(event: dict[str, Any], ctx: CompensationContext) -> None:
        raise PermanentError(f"cannot undo broken thing {event.get('n')}")

    saga.irreversible("Emailed", action="Send the customer a correction e-mail")
    del undo_step, undo_broken
    return saga


class ApiRuntime:
    """The parts of a ready `Runtime` that the HTTP API uses."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        engine: RollbackEngine,
        publisher: KafkaPublisher | None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.engine = engine
        self.publisher = publisher
        self.registry = engine.registry
        self.statuses = engine.status
        self.tracker = None
        self.is_ready = True

    @classmethod
    async def open(
        cls, settings: Settings, sagas: Sequence[Saga] = (), *, publisher: bool = True
    ) -> ApiRuntime:
        """Open the ledger, build the engine, start a producer (unless told not to)."""
        registry = SagaRegistry()
        for saga in sagas:
            registry.add(saga)
        ledger = await Ledger.open(settings.database_url)
        engine = RollbackEngine(
            ledger,
            registry,
            commands=RecordingSink(),
            status=RecordingStatus(),
            failures=RecordingFailures(),
            clock=SystemClock(),
            settings=EngineSettings(poll_interval=0.05, progress_interval=0.05),
        )
        producer = None
        if publisher:
            producer = KafkaPublisher(settings.bootstrap_servers, client_id="api-test")
            await producer.start()
        return cls(settings, ledger, engine, producer)

    async def close(self) -> None:
        """Stop runs, the producer and the ledger."""
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        await self.ledger.close()

    async def track(
        self, deployment_id: str, *event_types: str, service: str = "svc", version: str = "1.0"
    ) -> list[TrackedEvent]:
        """Track one event per type for a deployment, as the tracker would."""
        start = datetime.now(UTC) - timedelta(minutes=10)
        events = [
            TrackedEvent(
                event_id=str(uuid.uuid4()),
                event_type=event_type,
                schema_version=1,
                service=service,
                service_version=version,
                deployment_id=deployment_id,
                occurred_at=start + timedelta(seconds=n),
                payload={"n": n},
                correlation_id=f"{deployment_id}-{n}",
            )
            for n, event_type in enumerate(event_types)
        ]
        result = await self.ledger.track(events, now=datetime.now(UTC))
        await self.engine.on_tracked(result)
        return events


async def read_records(
    bootstrap: str, topic: str, *, count: int, timeout: float = 15.0, quiet: float = 0.5
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on `topic` from the beginning: at least `count`, then `quiet` seconds more.

    The wait after `count` catches records that should not be there.
    """
    # The topic may not exist yet: the worker's publisher creates it on first use.
    consumer = await open_reader(bootstrap, [topic], wait=timeout)
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        if missing_topics(consumer, [topic]):
            raise AssertionError(f"topic {topic} does not exist after {timeout:g}s")
        deadline = time.monotonic() + timeout
        enough_at: float | None = None
        while True:
            now = time.monotonic()
            if len(records) >= count:
                enough_at = enough_at or now
                if now - enough_at >= quiet:
                    break
            elif now > deadline:
                raise AssertionError(
                    f"{len(records)} of {count} records on {topic} after {timeout:g}s"
                )
            batch = await consumer.getmany(timeout_ms=100)
            for part in batch.values():
                records.extend(part)
    finally:
        await consumer.stop()
    return records
