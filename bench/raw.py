"""Raw baselines: what plain aiokafka code does with the same records.

`python -m bench.raw track ...` reads the tracked topics with a plain
aiokafka consumer (same consumer settings and batch size as the worker's
tracker) and bulk-inserts the same rows into the same `events` table with
the same driver: SQLAlchemy Core, INSERT ... ON CONFLICT DO NOTHING, one
transaction per batch, then commits the offsets. No validation beyond
`json.loads`, no deduplication in memory, no dead letters, no confirmations.

`python -m bench.raw rollback ...` reads N event records and produces one
command per record (same producer settings as the worker's publisher),
without any ledger: the floor under "read an event, send a command".

Each prints one JSON line with what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer

from bench.workload import PARTITIONS, batching_producer
from consumers.topics import open_reader
from sagas.ledger import tables as t
from sagas.ledger.connection import create_engine
from sagas.ledger.dialect import insert_ignoring_duplicates
from sagas.ledger.tracking import chunks


def _row(topic: str, partition: int, offset: int, value: bytes, now: datetime) -> dict[str, Any]:
    document = json.loads(value)
    return {
        "event_id": document["event_id"],
        "event_type": document["event_type"],
        "schema_version": document["schema_version"],
        "service": document["service"],
        "service_version": document["service_version"],
        "deployment_id": document["deployment_id"],
        "occurred_at": datetime.fromisoformat(document["occurred_at"]),
        "correlation_id": document.get("correlation_id"),
        "causation_id": document.get("causation_id"),
        "key": document.get("key"),
        "payload": document["payload"],
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "traceparent": None,
        "tracestate": None,
        "tracked_at": now,
    }


async def track(bootstrap: str, topics: list[str], url: str, events: int, batch: int) -> None:
    engine = create_engine(url)
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{time.time_ns()}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        max_poll_records=batch,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    seen = 0
    started = None
    try:
        while seen < events:
            records = await consumer.getmany(timeout_ms=500, max_records=batch)
            if not records:
                continue
            started = started or time.monotonic()
            now = datetime.now(UTC)
            rows = [
                _row(tp.topic, tp.partition, r.offset, r.value, now)
                for tp, rs in records.items()
                for r in rs
                if r.value is not None
            ]
            async with engine.begin() as conn:
                statement = insert_ignoring_duplicates(conn, t.events, ["event_id"])
                for part in chunks(rows):
                    await conn.execute(statement, list(part))
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in records.items() if rs})
            seen += len(rows)
    finally:
        await consumer.stop()
        await engine.dispose()
    elapsed = time.monotonic() - (started or time.monotonic())
    print(json.dumps({"events": seen, "seconds_after_first_batch": elapsed}), flush=True)


async def rollback(bootstrap: str, topics: list[str], command_topic: str, events: int) -> None:
    producer = batching_producer(bootstrap)
    consumer = await open_reader(
        bootstrap, topics, partitions=PARTITIONS, max_partition_fetch_bytes=4 * 1024 * 1024
    )
    await producer.start()
    seen = 0
    started = time.monotonic()
    try:
        pending: list[asyncio.Future[Any]] = []
        while seen < events:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for record in records:
                    if seen >= events or record.value is None:
                        break
                    document = json.loads(record.value)
                    order_id = document["payload"]["order_id"]
                    command = {"command": "Undo", "order_id": order_id, "of": document["event_id"]}
                    pending.append(
                        await producer.send(
                            command_topic,
                            value=json.dumps(command, separators=(",", ":")).encode(),
                            key=order_id.encode(),
                            headers=[("backout-compensates", document["event_id"].encode())],
                        )
                    )
                    seen += 1
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        elapsed = time.monotonic() - started
    finally:
        await consumer.stop()
        await producer.stop()
    print(json.dumps({"events": seen, "seconds": elapsed}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    tracking = sub.add_parser("track")
    tracking.add_argument("--bootstrap", required=True)
    tracking.add_argument("--topics", required=True)
    tracking.add_argument("--url", required=True)
    tracking.add_argument("--events", type=int, required=True)
    tracking.add_argument("--batch", type=int, default=2000)
    undo = sub.add_parser("rollback")
    undo.add_argument("--bootstrap", required=True)
    undo.add_argument("--topics", required=True)
    undo.add_argument("--command-topic", required=True)
    undo.add_argument("--events", type=int, required=True)
    args = parser.parse_args()
    if args.what == "track":
        coro = track(args.bootstrap, args.topics.split(","), args.url, args.events, args.batch)
    else:
        coro = rollback(args.bootstrap, args.topics.split(","), args.command_topic, args.events)
    asyncio.run(coro)


if __name__ == "__main__":
    main()
