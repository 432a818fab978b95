"""`Tracker.caught_up`: a signal's wait for tracking, against a real broker and ledger.

The engine asks before it reads a blast radius (unit-tested in
test_executor.py); here is what the answer rests on: the tracked topics' end
offsets and the tracker group's committed offsets, whoever tracked each
partition, also across a broker that restarted empty.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumers.broker import EmbeddedBroker
from consumers.decoding import EventDecoder
from consumers.settings import Settings
from consumers.tracker import Tracker
from sagas.clock import SystemClock
from sagas.engine import RollbackEngine
from sagas.ledger import Ledger
from sagas.registry import SagaRegistry
from schemas.envelope import EventEnvelope
from tests.support.names import unique_name

PARTITIONS = 4


class _NoCommands:
    async def send(self, topic: str, value: bytes, key: bytes | None, headers: object) -> None:
        raise AssertionError("nothing is rolled back here")


def _tracker(settings: Settings, ledger: Ledger) -> Tracker:
    registry = SagaRegistry()
    return Tracker(
        settings,
        ledger=ledger,
        engine=RollbackEngine(ledger, registry, commands=_NoCommands()),
        decoder=EventDecoder(registry, track_unknown=True),
        dead_letters=None,  # type: ignore[arg-type]  # every record here is valid
        clock=SystemClock(),
    )


@pytest.fixture
def topic() -> str:
    return f"{unique_name('catchup')}.events"


@pytest.fixture(params=["names", "pattern"])
async def settings(
    request: pytest.FixtureRequest, kafka_bootstrap: str, sqlite_url: str, topic: str
) -> Settings:
    """Tracked topics by name, or by pattern (resolved against the broker's topics)."""
    topics = {"event_topics": topic}
    if request.param == "pattern":
        topics = {"event_topic_pattern": re.escape(topic)}
    return Settings(
        broker=f"kafka://{kafka_bootstrap}",
        database_url=sqlite_url,
        app_id=unique_name("catchup-app"),
        session_timeout=2.0,
        topic_refresh_seconds=0.2,
        **topics,
    )


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(settings.database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def _produce(settings: Settings, topic: str, count: int, *, first: int = 0) -> None:
    """`count` events, one record per produce (the development broker's end
    offsets are exact only for single-record batches), over every partition."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for n in range(first, first + count):
            envelope = EventEnvelope(
                event_id=f"{settings.app_id}-{n}",
                event_type="Noted",
                schema_version=1,
                service="notes",
                service_version="1.0",
                deployment_id="notes-1.0",
                occurred_at=datetime.now(UTC),
                payload={"n": n},
            )
            await producer.send_and_wait(
                topic,
                envelope.model_dump_json().encode(),
                partition=n % PARTITIONS,
            )
    finally:
        await producer.stop()


async def _track(tracker: Tracker, count: int) -> None:
    """Fetch and process batches (as the tracker's loop does) until `count` events are new."""
    consumer = tracker._consumer
    assert consumer is not None
    tracked = 0
    for _ in range(200):
        batch = await consumer.getmany(timeout_ms=200)
        if batch:
            tracked += len((await tracker.process(batch)).new_events)
        if tracked >= count:
            return
    raise AssertionError(f"only {tracked} of {count} events tracked")


async def test_caught_up_only_once_the_ledger_holds_what_is_on_the_topics(
    settings: Settings, topic: str, ledger: Ledger
) -> None:
    await _produce(settings, topic, 4 * PARTITIONS)  # creates the topic (4 partitions)
    tracker = _tracker(settings, ledger)
    await tracker.on_start()  # subscribed; its consuming loop is not running
    try:
        # Nothing tracked yet, no partition assigned: the group's commits say so.
        assert await tracker.caught_up(0.5) is False

        await _track(tracker, 4 * PARTITIONS)
        assert tracker._consumer is not None
        assert tracker._consumer.assignment()
        assert await tracker.caught_up(10) is True

        # More events on the topics, not tracked: behind again, until they are.
        await _produce(settings, topic, PARTITIONS, first=100)
        assert await tracker.caught_up(0.5) is False
        await _track(tracker, PARTITIONS)
        assert await tracker.caught_up(10) is True
        assert len(await ledger.deployment_events("notes-1.0", None, None)) == 5 * PARTITIONS
    finally:
        await tracker.on_stop()


async def test_what_another_member_tracked_counts_by_the_groups_commits(
    settings: Settings, topic: str, ledger: Ledger
) -> None:
    """A tracker that stored nothing itself (another worker tracked the
    partitions, or this one before its last rebalance) is caught up once the
    group's commits reach the end offsets."""
    await _produce(settings, topic, 2 * PARTITIONS)
    worker = _tracker(settings, ledger)
    await worker.on_start()
    try:
        await _track(worker, 2 * PARTITIONS)
    finally:
        await worker.on_stop()  # leaves the group, its commits stay

    bystander = _tracker(settings, ledger)
    await bystander.on_start()
    try:
        assert await bystander.caught_up(10) is True
        await _produce(settings, topic, 1, first=100)
        assert await bystander.caught_up(0.5) is False
    finally:
        await bystander.on_stop()


async def test_no_tracked_topic_yet_is_caught_up(settings: Settings, ledger: Ledger) -> None:
    """Nothing was ever produced: nothing to wait for."""
    tracker = _tracker(settings, ledger)
    await tracker.on_start()
    try:
        assert await tracker.caught_up(5) is True
    finally:
        await tracker.on_stop()


async def test_a_broker_that_lost_its_log_is_not_caught_up_from_before(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The development broker restarts empty and gets new events before the
    tracker has noticed (no heartbeat yet, so no rejoin): what it stored from the
    old log says nothing of the new one, whose end offsets are lower."""
    topic = f"{unique_name('restart')}.events"
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    broker.start(timeout=60)
    settings = Settings(
        broker=f"kafka://{broker.bootstrap}",
        database_url=sqlite_url,
        app_id=unique_name("restart-app"),
        # No heartbeat within the test: the tracker does not notice the
        # restart (a heartbeat would make it rejoin), as in the seconds
        # before it does in a worker.
        session_timeout=2.0,
        heartbeat_interval=120.0,
        event_topics=topic,
    )
    ledger = await Ledger.open(settings.database_url)
    tracker = _tracker(settings, ledger)
    try:
        await _produce(settings, topic, 3 * PARTITIONS)
        await tracker.on_start()
        await _track(tracker, 3 * PARTITIONS)
        assert await tracker.caught_up(10) is True

        broker.stop()
        broker = EmbeddedBroker(port=broker.port, log_path=broker.log_path)
        broker.start(timeout=60)
        await _produce(settings, topic, PARTITIONS, first=100)  # offset 0 of each partition

        assert await tracker.caught_up(1.0) is False

        # Once in the new broker's group (this tracker at its next
        # heartbeat; a new one here), the new log is tracked from its start.
        await tracker.on_stop()
        tracker = _tracker(settings, ledger)
        await tracker.on_start()
        await _track(tracker, PARTITIONS)
        assert await tracker.caught_up(10) is True
    finally:
        try:
            await tracker.on_stop()
            await ledger.close()
        finally:
            broker.stop()  # whatever failed above: no broker left running
