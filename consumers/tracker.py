"""The tracker: domain events on tracked topics → the ledger, in batches.

faust's per-record stream machinery costs ~50 times a raw `getmany` loop
(BROKER.md), so this high-volume path is a faust `Service` owning a plain
aiokafka consumer with manual commits: a batch is validated, its bad records
dead-lettered, its good records written to the ledger in one transaction,
and only then are its offsets committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from mode import Service

from consumers import metrics
from consumers.decoding import EventDecoder, Rejected
from consumers.memory import MemoryReleaser
from consumers.publisher import BadRecord, DeadLetters
from consumers.settings import Settings
from sagas.clock import Clock
from sagas.engine import RollbackEngine
from sagas.ledger import Ledger, TrackedEvent, TrackedOffset, TrackResult

log = logging.getLogger(__name__)

Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]

# How often `caught_up` looks again at the partitions still behind.
CATCH_UP_POLL_SECONDS = 0.05


class _Revocations(ConsumerRebalanceListener):
    """Counts partition revocations (every rebalance of this member starts with one)."""

    def __init__(self) -> None:
        self.count = 0

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.count += 1

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


class Tracker(Service):
    """Consumes tracked topics and writes envelopes to the ledger."""

    def __init__(
        self,
        settings: Settings,
        *,
        ledger: Ledger,
        engine: RollbackEngine,
        decoder: EventDecoder,
        dead_letters: DeadLetters,
        clock: Clock,
        on_batch: Callable[[TrackResult], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.ledger = ledger
        self.engine = engine
        self.decoder = decoder
        self.dead_letters = dead_letters
        self.clock = clock
        self.on_batch = on_batch
        self.group_id = f"{settings.app_id}-tracker"
        self.tracked = 0
        self.duplicates = 0
        self.invalid = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._revocations = _Revocations()
        self._memory = MemoryReleaser()

    async def on_start(self) -> None:
        """Connect and subscribe (by names, or by the anchored pattern)."""
        s = self.settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=self.group_id,
            client_id=f"{s.app_id}-tracker",
            enable_auto_commit=False,
            # A new group starts at the beginning: events produced before the
            # worker first started are tracked too.
            auto_offset_reset="earliest",
            session_timeout_ms=int(s.session_timeout * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval * 1000),
            # The pattern is re-resolved against the broker's topic list at
            # this interval, so new matching topics join without a restart.
            metadata_max_age_ms=int(s.topic_refresh_seconds * 1000),
            max_poll_records=s.tracker_batch_size,
            fetch_max_wait_ms=100,
            # What the fetcher may hold per partition ahead of processing: at
            # 4 MB, 12 partitions of backlog could keep ~50 MB of raw records
            # resident; 1 MB still fills a 2,000-record batch.
            max_partition_fetch_bytes=1024 * 1024,
        )
        if s.tracked_topic_names:
            self._consumer.subscribe(topics=s.tracked_topic_names, listener=self._revocations)
        else:
            self._consumer.subscribe(pattern=s.tracked_pattern.pattern, listener=self._revocations)
        await self._consumer.start()

    async def on_stop(self) -> None:
        """Leave the group."""
        if self._consumer is not None:
            await self._consumer.stop()

    @Service.task
    async def _consume(self) -> None:
        assert self._consumer is not None
        while not self.should_stop:
            fetched_in = self._revocations.count
            try:
                batch = await self._consumer.getmany(
                    timeout_ms=500, max_records=self.settings.tracker_batch_size
                )
            except KafkaError as exc:
                log.warning("tracker fetch failed, retrying: %s", exc)
                await self.sleep(1.0)
                continue
            if batch:
                await self.process(batch, fetched_in=fetched_in)

    async def caught_up(self, timeout: float) -> bool:
        """Wait, at most `timeout` seconds, until the ledger holds every record
        on the tracked topics now: each partition tracked up to its end offset.

        Every partition counts by the group's committed offsets, which a
        tracker (this one or another worker's) moves only after its ledger
        write. Not by what this tracker remembers storing: after the
        development broker restarts empty, that belongs to a log that is gone,
        and until the tracker notices (a rebalance, seconds later) it would
        cover the new log's lower end offsets without having read a record of
        it; the broker's committed offsets went with the old log.
        On the development broker, end offsets can be low after a
        multi-record batch (BROKER.md): the wait may then end once the
        batch's first record is tracked (its fetch holds the whole batch).

        Returns:
            False when the time ran out or the broker could not be asked.
        """
        consumer = self._consumer
        if consumer is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                partitions = [
                    TopicPartition(topic, partition)
                    for topic in sorted(consumer.subscription())
                    for partition in sorted(consumer.partitions_for_topic(topic) or ())
                ]
                if not partitions:
                    return True
                # Asked together: one round trip when tracking is there already.
                ends, committed = await asyncio.gather(
                    consumer.end_offsets(partitions), _committed(consumer, partitions)
                )
                behind = {tp: end for tp, end in ends.items() if end > 0}
                while True:
                    behind = {tp: end for tp, end in behind.items() if committed[tp] < end}
                    if not behind:
                        return True
                    await asyncio.sleep(CATCH_UP_POLL_SECONDS)
                    committed = await _committed(consumer, list(behind))
        except TimeoutError:
            return False
        except KafkaError as exc:
            log.warning("could not read the tracked topics' offsets: %s", exc)
            return False

    async def process(self, batch: Batch, *, fetched_in: int | None = None) -> TrackResult:
        """Dead-letter the bad records, store the good ones, then commit.

        `fetched_in` is the rebalance count when the batch was fetched: when a
        rebalance came between the fetch and the commit, the offsets are not
        committed (see `_commit`).
        """
        events: list[TrackedEvent] = []
        offsets: list[TrackedOffset] = []
        commit: dict[TopicPartition, int] = {}
        rejected: list[BadRecord] = []
        for tp, records in batch.items():
            for record in records:
                decoded = self.decoder.decode(
                    record.value,
                    list(record.headers or ()),
                    topic=tp.topic,
                    partition=tp.partition,
                    offset=record.offset,
                )
                if isinstance(decoded, Rejected):
                    rejected.append(self._rejected(tp, record, decoded.reason))
                else:
                    events.append(decoded)
            if records:
                next_offset = records[-1].offset + 1
                commit[tp] = next_offset
                offsets.append(TrackedOffset(self.group_id, tp.topic, tp.partition, next_offset))
        if rejected:
            # On the DLQ topic before the batch's offsets are committed.
            await self.dead_letters.record_all(rejected, now=self.clock.now())
        result = await self._store(events, offsets)
        self.tracked += len(result.new_events)
        self.duplicates += result.duplicates
        self.invalid += len(rejected)
        metrics.record_tracked(result.new_events, result.duplicates)
        try:
            await self.engine.on_tracked(result)
        except Exception:
            log.exception("late-event / confirmation handling failed for a tracked batch")
        if self.on_batch is not None:
            self.on_batch(result)
        await self._commit(commit, fetched_in)
        self._record_lag(commit)
        await self._memory.count(sum(len(records) for records in batch.values()))
        return result

    def _record_lag(self, positions: dict[TopicPartition, int]) -> None:
        """Consumer lag from the high-water marks the fetches already returned (no extra
        request; on the development broker the high-water mark can be off after batches)."""
        assert self._consumer is not None
        for tp, position in positions.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(highwater - position, 0)
                )

    def _rejected(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], reason: str
    ) -> BadRecord:
        metrics.EVENTS_INVALID.labels(topic=tp.topic).inc()
        log.info("dead-lettering %s[%d]@%d: %s", tp.topic, tp.partition, record.offset, reason)
        return BadRecord(
            value=record.value,
            key=record.key,
            headers=list(record.headers or ()),
            error=reason,
            source_topic=tp.topic,
            source_partition=tp.partition,
            source_offset=record.offset,
        )

    async def _store(self, events: list[TrackedEvent], offsets: list[TrackedOffset]) -> TrackResult:
        """Write to the ledger, retrying through outages: offsets wait until it lands."""
        delay = 0.2
        retrying = False
        while True:
            started = time.perf_counter()
            try:
                result = await self.ledger.track(
                    events,
                    offsets,
                    now=self.clock.now(),
                    confirmed_by=self.engine.instance_id,
                    retrying=retrying,
                )
            except Exception as exc:
                if self.should_stop:
                    raise
                log.warning("ledger write failed (retrying in %.1fs): %s", delay, exc)
                retrying = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            metrics.LEDGER_WRITE_SECONDS.observe(time.perf_counter() - started)
            return result

    async def _commit(self, offsets: dict[TopicPartition, int], fetched_in: int | None) -> None:
        assert self._consumer is not None
        if not offsets:
            return
        if fetched_in is not None and fetched_in != self._revocations.count:
            # The group rebalanced while the batch was stored. aiokafka would
            # commit it under the new generation, and the new assignment may
            # already have read its positions from that commit: offsets read
            # from a log the broker has since lost (a restarted development
            # broker) would then skip the new log's first records. The batch
            # is stored; whoever owns the partitions now reads it again from
            # the last commit and the ledger ignores the duplicates.
            log.info("partitions were reassigned while a batch was stored: not committing it")
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The partitions moved to another worker mid-batch; it re-reads
            # from the last commit and the ledger drops the duplicates.
            log.warning("offset commit failed (records will be re-read): %s", exc)


async def _committed(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """The group's committed offset of each partition (-1: none yet)."""
    offsets = await asyncio.gather(*(consumer.committed(tp) for tp in partitions))
    return {
        tp: -1 if offset is None else offset for tp, offset in zip(partitions, offsets, strict=True)
    }
