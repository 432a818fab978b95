"""The peer row's workload: N instances x 2 steps, undone without confirmations.

The benchmark's peer row compares Backout and DBOS on this workload
(`bench/peer_saga.py`, `bench/peer_dbos.py`); here the saga module runs
through the saga harness (a real SQLite ledger, no broker) on envelopes from
the benchmark's own generator, so that the row measures a rollback that
completes and undoes each instance child first.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bench.peer_saga import STEPS, peer, peer_command_topic
from bench.workload import Workload, envelopes
from sagas.testing import SagaTestHarness
from schemas.envelope import EventEnvelope

PREFIX = "peer-test."


async def test_the_peer_workload_is_undone_child_first_without_confirmations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BENCH_TOPIC_PREFIX", PREFIX)
    workload = Workload(PREFIX)
    records = list(envelopes(workload, 20, STEPS))
    events = [EventEnvelope.model_validate_json(value) for _, _, value in records]
    assert len(events) == 20
    by_id = {e.event_id: e for e in events}
    # Ten instances of two events, the second caused by the first.
    assert [e.event_type for e in events[:2]] == ["PeerOrderPlaced", "PeerPaymentCaptured"]
    assert {e.causation_id for e in events[1::2]} == {e.event_id for e in events[::2]}
    assert len({e.correlation_id for e in events}) == 10

    async with SagaTestHarness(peer) as harness:
        await harness.emit(*events)
        # The generator stamps events an hour ago; the harness's clock starts
        # earlier, so the signal says when it was issued.
        rollback = await harness.rollback(
            workload.deployment_id, force=True, issued_at=datetime.now(UTC)
        )
        assert rollback.state == "completed"
        compensations = await harness.compensations(rollback.rollback_id)
        # No step declares a confirmation: applied is where each one ends.
        assert [c.state for c in compensations] == ["applied"] * 20
        assert {c.event_id for c in compensations} == set(by_id)

    sent_order: dict[str, list[str]] = {}
    for command in harness.sent:
        body = command.json()
        sent_order.setdefault(body["order_id"], []).append(body["command"])
        service = "orders" if body["command"] == "CancelOrder" else "payments"
        assert command.topic == peer_command_topic(service, PREFIX)
        assert set(body) == {"command", "order_id"}  # what DBOS's step sends
    assert len(sent_order) == 10
    assert all(order == ["RefundPayment", "CancelOrder"] for order in sent_order.values())
