"""Fast fake services: answer every compensation command with its confirmation.

`python -m bench.services --bootstrap HOST:PORT --prefix PREFIX` reads the
three command topics of a run with a plain aiokafka `getmany` loop and, per
command, emits the confirming event (`causation_id` = the command's
idempotency key) on the service's event topic, in batches. A command seen
again (at-least-once delivery) is confirmed again with the same event id, so
the ledger deduplicates it: a service applies each key at most once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

from bench.saga import CONFIRMATION_OF, SERVICES, command_topic, event_topic
from bench.workload import PARTITIONS, SERVICE_DEPLOYMENTS, batching_producer
from consumers.topics import open_reader
from schemas.headers import IDEMPOTENCY_KEY_HEADER

# The orders service runs the version it was rolled back to when it confirms.
ROLLED_BACK_TO = "bench-orders-1.9"
NAMESPACE = uuid.UUID("0b5e7c1e-55a1-4c6e-9f2b-5e4d1c0ffee5")


def _idempotency_key(headers: Iterable[tuple[str, bytes]] | None) -> str | None:
    for name, value in headers or ():
        if name == IDEMPOTENCY_KEY_HEADER:
            return bytes(value).decode()
    return None


async def serve(bootstrap: str, prefix: str, stop: asyncio.Event) -> int:
    """Confirm commands until `stop` is set; returns how many were confirmed."""
    topics = {command_topic(s, prefix): s for s in SERVICES}
    producer = batching_producer(bootstrap, linger_ms=2)
    consumer = await open_reader(
        bootstrap,
        topics,
        partitions=PARTITIONS,
        # The broker answers a waiting fetch only when the wait ends: this
        # bounds the services' share of each confirmation's latency.
        fetch_max_wait_ms=20,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await producer.start()
    seen: set[str] = set()
    confirmed = 0
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            pending = []
            for tp, records in batch.items():
                service = topics[tp.topic]
                for record in records:
                    key = _idempotency_key(record.headers)
                    if key is None or record.value is None:
                        continue
                    command = json.loads(record.value)
                    seen.add(key)
                    order_id = command["order_id"]
                    document = {
                        "event_id": str(uuid.uuid5(NAMESPACE, key)),
                        "event_type": CONFIRMATION_OF[command["command"]],
                        "schema_version": 1,
                        "service": service,
                        "service_version": "2.0" if service == "orders" else "1.0",
                        "deployment_id": SERVICE_DEPLOYMENTS.get(service, ROLLED_BACK_TO),
                        "occurred_at": datetime.now(UTC).isoformat(),
                        "correlation_id": order_id,
                        "causation_id": key,
                        "key": order_id,
                        "payload": {"order_id": order_id},
                    }
                    pending.append(
                        await producer.send(
                            event_topic(service, prefix),
                            value=json.dumps(document, separators=(",", ":")).encode(),
                            key=order_id.encode(),
                        )
                    )
            if pending:
                await asyncio.gather(*pending)
                confirmed += len(pending)
    finally:
        await consumer.stop()
        await producer.stop()
    return confirmed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        confirmed = await serve(args.bootstrap, args.prefix, stop)
        print(json.dumps({"confirmed": confirmed}), flush=True)

    asyncio.run(run())


if __name__ == "__main__":
    main()
