"""The peer row: the same compensation workload as DBOS Transact workflows.

Runs in its own virtualenv (`bench/.venv-dbos`, with `dbos` and `aiokafka`):
dbos pins a croniter that conflicts with faust's, so it cannot share the
project's environment. Standalone on purpose: from the project it imports
only `consumers.topics`, which needs nothing but aiokafka (the benchmark puts
the repository on PYTHONPATH).

Workload (the issue's: N instances x 2 idempotent steps, `bench/peer_saga.py`):
read the N x 2 event records of one benchmark run from Kafka (plain
aiokafka, as the raw baseline does), group them by saga instance
(`correlation_id`) and run one durable workflow per instance that undoes its
events in reverse order, one checkpointed step per compensation, each step
producing the command to the owning service's command topic. DBOS records
every step in its PostgreSQL system database, which is what makes it
crash-safe, just as Backout's ledger does. Neither side awaits a
confirmation (DBOS would need a `recv` per step fed by a consumer): the
peer saga declares none.

Prints one JSON line: {"events": N, "workflows": W, "seconds": S}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

from aiokafka import AIOKafkaProducer
from dbos import DBOS, DBOSConfig

from consumers.topics import open_reader

PARTITIONS = 4
# The peer saga's steps (`bench/peer_saga.py`), whose commands Backout sends
# to the same topics with the same JSON.
COMMANDS = {
    "PeerOrderPlaced": ("orders", "CancelOrder"),
    "PeerPaymentCaptured": ("payments", "RefundPayment"),
}

producer: AIOKafkaProducer | None = None
prefix = "bench."


@DBOS.step()
async def send_command(event: dict[str, Any]) -> None:
    assert producer is not None
    service, command = COMMANDS[event["event_type"]]
    order_id = event["payload"]["order_id"]
    await producer.send_and_wait(
        f"{prefix}peer.{service}.commands",
        value=json.dumps({"command": command, "order_id": order_id}).encode(),
        key=order_id.encode(),
        headers=[("backout-compensates", event["event_id"].encode())],
    )


@DBOS.workflow()
async def undo_instance(events: list[dict[str, Any]]) -> int:
    # Children before parents: the reverse of the forward (occurred_at) order.
    for event in sorted(events, key=lambda e: e["occurred_at"], reverse=True):
        await send_command(event)
    return len(events)


async def read_events(bootstrap: str, topics: list[str], events: int) -> list[dict[str, Any]]:
    consumer = await open_reader(bootstrap, topics, partitions=PARTITIONS)
    found: list[dict[str, Any]] = []
    try:
        while len(found) < events:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                found.extend(json.loads(r.value) for r in records if r.value is not None)
    finally:
        await consumer.stop()
    return found[:events]


async def run(args: argparse.Namespace) -> None:
    global producer, prefix
    prefix = args.prefix
    config: DBOSConfig = {
        "name": "backout-bench-peer",
        "system_database_url": args.database_url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        started = time.monotonic()
        events = await read_events(args.bootstrap, args.topics.split(","), args.events)
        instances: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            instances.setdefault(event["correlation_id"], []).append(event)
        handles = [
            await DBOS.start_workflow_async(undo_instance, group) for group in instances.values()
        ]
        done = sum(await asyncio.gather(*(h.get_result() for h in handles)))
        elapsed = time.monotonic() - started
    finally:
        await producer.stop()
        DBOS.destroy()
    print(json.dumps({"events": done, "workflows": len(instances), "seconds": elapsed}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topics", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
