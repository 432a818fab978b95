"""Generating and producing the benchmark's events (not timed).

Envelopes follow the wire contract (DESIGN §2.1). One saga instance is a
chain of events linked by `causation_id` across services: four over three
services for the rollback rows (`bench.saga`), two for the peer row
(`bench.peer_saga`); the orders service's events come from the deployment
the rollback undoes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from bench.saga import SERVICES, STEPS, command_topic, event_topic

# (event type, service, command, confirmation type), in forward order.
Steps = Sequence[tuple[str, str, str, str | None]]

PARTITIONS = 4
SERVICE_DEPLOYMENTS = {"payments": "bench-payments-1.0", "stock": "bench-stock-1.0"}


@dataclass(frozen=True, slots=True)
class Workload:
    """One run's topics and the deployment its rollback undoes."""

    prefix: str

    @property
    def deployment_id(self) -> str:
        return f"{self.prefix.rstrip('.')}-orders-2.0"

    def deployment_of(self, service: str) -> str:
        return self.deployment_id if service == "orders" else SERVICE_DEPLOYMENTS[service]

    @property
    def event_topics(self) -> list[str]:
        return [event_topic(s, self.prefix) for s in SERVICES]

    @property
    def command_topics(self) -> list[str]:
        return [command_topic(s, self.prefix) for s in SERVICES]


def payload_of(event_type: str, n: int, order_id: str) -> dict[str, object]:
    """The payload of instance `n`'s event of `event_type` (Bench* and Peer* alike)."""
    if event_type.endswith("OrderPlaced"):
        return {"order_id": order_id, "customer_id": f"c-{n % 977}", "total_cents": 4200}
    if event_type.endswith("PaymentCaptured"):
        return {"order_id": order_id, "payment_id": f"p-{n}", "amount_cents": 4200}
    if event_type.endswith("StockReserved"):
        return {"order_id": order_id, "sku": f"sku-{n % 311}", "quantity": 1}
    return {"order_id": order_id}


def envelopes(
    workload: Workload, events: int, steps: Steps = STEPS
) -> Iterator[tuple[str, bytes, bytes]]:
    """(topic, key, value) of `events` events: `events // len(steps)` saga instances."""
    base = datetime.now(UTC) - timedelta(hours=1)
    instances = max(1, events // len(steps))
    for n in range(instances):
        order_id = f"o-{n:07d}"
        parent: str | None = None
        at = base + timedelta(milliseconds=n)
        for step, (event_type, service, _, _) in enumerate(steps):
            event_id = str(uuid.uuid4())
            payload = payload_of(event_type, n, order_id)
            document: dict[str, object] = {
                "event_id": event_id,
                "event_type": event_type,
                "schema_version": 1,
                "service": service,
                "service_version": "2.0" if service == "orders" else "1.0",
                "deployment_id": workload.deployment_of(service),
                "occurred_at": (at + timedelta(microseconds=step * 10)).isoformat(),
                "correlation_id": order_id,
                "key": order_id,
                "payload": payload,
            }
            if parent is not None:
                document["causation_id"] = parent
            parent = event_id
            yield (
                event_topic(service, workload.prefix),
                order_id.encode(),
                json.dumps(document, separators=(",", ":")).encode(),
            )


async def create_topics(bootstrap: str, topics: Sequence[str]) -> None:
    """Create topics with the partition count the broker would auto-create."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in missing]
                )
    finally:
        await admin.close()


def batching_producer(bootstrap: str, **settings: Any) -> AIOKafkaProducer:
    """A producer (not started): acks=all, 5 ms linger, 256 KiB batches, 4 MiB requests.

    The benchmark's producers share these settings so that a row measures
    what it is about, not a difference in batching.
    """
    defaults: dict[str, Any] = {
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "max_request_size": 4 * 1024 * 1024,
    }
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **{**defaults, **settings})


async def produce(bootstrap: str, records: Iterator[tuple[str, bytes, bytes]]) -> int:
    """Produce records with batching (acks=all); returns how many were acknowledged."""
    producer = batching_producer(bootstrap)
    await producer.start()
    sent = 0
    try:
        pending: list[asyncio.Future[object]] = []
        for topic, key, value in records:
            pending.append(await producer.send(topic, value=value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                sent += len(pending)
                pending = []
        await asyncio.gather(*pending)
        sent += len(pending)
    finally:
        await producer.stop()
    return sent
