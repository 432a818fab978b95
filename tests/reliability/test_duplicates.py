"""Duplicates: at-least-once delivery everywhere, one effect each.

DESIGN §2.1 (duplicate `event_id`s are tracked once), §2.2 (the same
`signal_id` twice is one rollback), §2.3 (services apply a command at most
once per idempotency key; confirmations match by causation id) and §4
("Idempotency": a compensation that is done is never run again, whatever
signal arrives). A producer that retries sends a record twice; here every
tracked event, every signal and every confirmation arrives at least twice,
and the test counts the effects: ledger rows, rollbacks, commands delivered
to the services, status records.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.reliability.conftest import metric, report
from tests.support.kafka import CommandCollector, Confirmation, Record, envelope
from tests.support.nasty import Nasty, Target, produce, read_until, targets, wait_tracked
from tests.support.waiting import wait_for

__all__ = ["targets"]  # the fixture, imported for pytest

pytestmark = pytest.mark.e2e

CHECKOUTS = 5
MakeTarget = Callable[..., Awaitable[Target]]


class DoubleConfirmingService(CommandCollector):
    """A fake orders/payments/stock service whose producer retries every answer.

    Like `CommandCollector` it keeps every command delivery (`records`) and
    applies each idempotency key once (`confirmed`); each confirmation it
    sends goes out twice, with the same event id, as a retrying producer does.
    """

    confirmations_sent: int = 0

    async def _answer(self, record: Record) -> None:
        confirmation = self.confirmations[record.topic]
        key = record.idempotency_key
        if key is None or key in self.confirmed:
            return
        assert self._producer is not None
        document = envelope(
            confirmation.event_type,
            service=confirmation.service,
            deployment_id=f"{confirmation.service}-1",
            payload={"order_id": record.json().get("order_id")},
            causation_id=key,
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"confirm/{key}")),
        )
        self.confirmed.add(key)
        for _ in range(2):
            await self._producer.event(confirmation.topic, document)
            self.confirmations_sent += 1


def _event(kind: str, event_type: str, deployment: str, **fields: Any) -> Nasty:
    document = envelope(event_type, service="orders", deployment_id=deployment, **fields)
    return Nasty(
        kind,
        _json(document),
        key=(document.get("key") or document.get("correlation_id") or "").encode() or None,
        good=True,
        event_id=document["event_id"],
    )


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def _checkouts(deployment: str) -> list[tuple[str, Nasty]]:
    """Per checkout: ItemOrdered, and Charged + Reserved caused by it (topic, record)."""
    made: list[tuple[str, Nasty]] = []
    for n in range(CHECKOUTS):
        order = f"{deployment}-o{n}"
        ordered = _event(
            "ordered",
            "ItemOrdered",
            deployment,
            schema_version=2,
            payload={"order_id": order, "quantity": 1},
            correlation_id=order,
        )
        made.append(("orders", ordered))
        for service, event_type in (("payments", "Charged"), ("stock", "Reserved")):
            child = _event(
                event_type.lower(),
                event_type,
                deployment,
                payload={"order_id": order},
                correlation_id=order,
                causation_id=ordered.event_id,
            )
            made.append((service, child))
    return made


def _signal(signal_id: str, deployment: str, **fields: Any) -> Nasty:
    document = {
        "signal_id": signal_id,
        "deployment_id": deployment,
        "issued_at": datetime.now(UTC).isoformat(),
        "reason": "duplicates test",
        **fields,
    }
    return Nasty("signal", _json(document), key=deployment.encode(), signal_id=signal_id)


def _statuses(records: list[Record], rollback_id: str) -> list[dict[str, Any]]:
    return [r.json() for r in records if r.json()["rollback_id"] == rollback_id]


async def _settle_signals(target: Target, deployment: str, records: list[Record]) -> str:
    """Send a dry run for `deployment` behind what was sent (same key, so same partition)
    and wait until it is planned: every signal before it has been processed."""
    sentinel = f"sentinel-{uuid.uuid4().hex}"
    await produce(
        target.bootstrap, [(target.signals_topic, _signal(sentinel, deployment, dry_run=True))]
    )
    found = await read_until(
        target.bootstrap,
        target.status_topic,
        lambda rs: any(s["state"] == "planned" for s in _statuses(rs, sentinel)),
        timeout=30,
        what=lambda _rs: f"dry run {sentinel} not planned",
    )
    records[:] = found
    return sentinel


@pytest.mark.timeout(180)
async def test_every_record_twice_gives_one_effect_each(
    targets: MakeTarget, ledger_url: str
) -> None:
    """Events, signals and confirmations all duplicated: every effect happens once."""
    target = await targets(ledger_url)
    deployment = f"{target.tag}-orders-3.1"
    events = _checkouts(deployment)
    routed = [(target.events_topic(service), record) for service, record in events]
    started = time.monotonic()

    # Each event twice in a row (a retried produce request), then the whole set
    # again once tracked (a replay after a timeout): a later batch.
    sent = await produce(target.bootstrap, routed, copies=2)
    ids = [record.event_id or "" for _, record in events]
    await wait_tracked(target, ids, timeout=30)
    # The replay comes without record keys (another producer, a mirror): other
    # partitions than the originals.
    sent += await produce(target.bootstrap, [(t, replace(r, key=None)) for t, r in routed])

    service = DoubleConfirmingService(
        target.bootstrap,
        [target.command_topic(s) for s in ("orders", "payments", "stock")],
        confirmations={
            target.command_topic("orders"): Confirmation(
                "ItemCancelled", target.events_topic("orders"), service="orders-svc"
            ),
            target.command_topic("payments"): Confirmation(
                "Refunded", target.events_topic("payments"), service="payments-svc"
            ),
        },
    )
    rollback_id = f"dup-{uuid.uuid4().hex}"
    async with service:
        # The signal twice as sent, plus a re-publication with other bytes
        # (a new issued_at and reason) but the same id.
        signal = _signal(rollback_id, deployment)
        again = _signal(rollback_id, deployment, reason="sent again by a retrying script")
        signals_sent = await produce(target.bootstrap, [(target.signals_topic, signal)], copies=2)
        signals_sent += await produce(target.bootstrap, [(target.signals_topic, again)])
        completed = await read_until(
            target.bootstrap,
            target.status_topic,
            lambda rs: any(s["state"] == "completed" for s in _statuses(rs, rollback_id)),
            timeout=60,
            what=lambda rs: (
                f"rollback {rollback_id} not completed: {_statuses(rs, rollback_id)[-1:]}"
            ),
        )
        # Once more after the end, then wait until the worker has read it too.
        signals_sent += await produce(target.bootstrap, [(target.signals_topic, signal)])
        statuses: list[Record] = list(completed)
        sentinel = await _settle_signals(target, deployment, statuses)
        # A second, different rollback of the same deployment: nothing is redone.
        second = f"dup2-{uuid.uuid4().hex}"
        await produce(target.bootstrap, [(target.signals_topic, _signal(second, deployment))])
        statuses = await read_until(
            target.bootstrap,
            target.status_topic,
            lambda rs: any(s["state"] == "completed" for s in _statuses(rs, second)),
            timeout=60,
            what=lambda rs: f"second rollback {second} not completed: {_statuses(rs, second)[-1:]}",
        )
        sentinel_2 = await _settle_signals(target, deployment, statuses)
        # Both confirmations of every key have been tracked (or found duplicate).
        expected_confirmations = 2 * CHECKOUTS

        async def confirmations_seen() -> bool:
            text = await _metrics(target)
            return (
                metric(text, "backout_events_duplicate_total")
                >= len(ids) * 2 + expected_confirmations
            )

        await wait_for(confirmations_seen, timeout=30, message="duplicate confirmations tracked")

    # -- the ledger: each event once, confirmations once each.
    async with target.ledger() as ledger:
        total = await ledger.count_events()
        rollbacks = [r.rollback_id for r in await ledger.list_rollbacks(limit=1000)]
        counts = await ledger.counts(rollback_id)
    assert total == len(ids) + expected_confirmations, "a duplicate was tracked twice"
    assert sorted(rollbacks) == sorted([rollback_id, second, sentinel, sentinel_2])

    summary = next(
        d for d in await target.worker.get("/api/deployments") if d["deployment_id"] == deployment
    )
    assert summary["by_type"] == {
        "Charged v1": CHECKOUTS,
        "ItemOrdered v2": CHECKOUTS,
        "Reserved v1": CHECKOUTS,
    }

    # -- the services: each command delivered once, applied once; confirmed once.
    by_key = service.by_key()
    assert len(by_key) == 3 * CHECKOUTS, f"{len(by_key)} idempotency keys"
    deliveries = collections.Counter(len(v) for v in by_key.values())
    assert deliveries == {1: 3 * CHECKOUTS}, f"deliveries per key: {deliveries}"
    assert {r.rollback_id for r in service.records} == {rollback_id}
    assert len(service.confirmed) == 2 * CHECKOUTS
    assert service.confirmations_sent == 2 * len(service.confirmed)

    # -- statuses: one rollback, one acceptance, one end, the right counts.
    mine = _statuses(statuses, rollback_id)
    states = collections.Counter(s["state"] for s in mine)
    assert states["accepted"] == 1, states
    assert states["completed"] == 1, states
    final = next(s for s in mine if s["state"] == "completed")
    wanted = {"planned": 3 * CHECKOUTS, "applied": 3 * CHECKOUTS, "confirmed": 2 * CHECKOUTS}
    assert {k: final[k] for k in wanted} == wanted, final
    assert (final["failed"], final["skipped"], final["late"]) == (0, 0, 0), final
    assert (counts.planned, counts.applied, counts.confirmed) == tuple(wanted.values())
    body = await target.worker.get(f"/api/rollbacks/{rollback_id}")
    assert {k: body[k] for k in wanted} == wanted

    again_final = next(s for s in _statuses(statuses, second) if s["state"] == "completed")
    duplicates = metric(await _metrics(target), "backout_events_duplicate_total")
    report(
        f"duplicates [{ledger_url.split(':')[0]}]: {len(sent)} event records for {len(ids)} events "
        f"-> {total - expected_confirmations} tracked; {service.confirmations_sent} confirmations "
        f"for {len(service.confirmed)} keys -> {expected_confirmations} tracked; "
        f"{len(signals_sent)} signal records with one id -> 1 rollback, "
        f"{states['accepted']} accepted / {states['completed']} completed status; "
        f"{len(service.records)} command deliveries for {len(by_key)} keys; a second rollback "
        f"of the same deployment redid nothing (applied {again_final['applied']}/"
        f"{again_final['planned']} already done); {int(duplicates)} duplicates recognised by the "
        f"tracker; {time.monotonic() - started:.1f}s"
    )


async def _metrics(target: Target) -> str:
    status, body = await target.worker.fetch("/metrics")
    assert status == 200
    return body if isinstance(body, str) else str(body)
