"""An exhausted compensation reaches the DLQ: its event, why, and where it came from.

The executor tells its `FailureSink` (unit-tested in test_executor.py); this
is the worker's sink, `DeadLetters`, against a real broker and ledger: what
an operator finds on `backout.dlq` and in `backout dlq list`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from consumers.publisher import BadRecord, DeadLetters, KafkaPublisher
from sagas.ledger import CompensationRecord, CompensationState, Ledger, TrackedEvent
from schemas.dlq import DeadLetter
from schemas.envelope import EventEnvelope
from schemas.headers import COMPENSATES_HEADER, IDEMPOTENCY_KEY_HEADER, ROLLBACK_ID_HEADER
from tests.support.kafka import read_topic
from tests.support.names import unique_name

OCCURRED = datetime(2026, 11, 26, 9, 30, 15, 250_000, tzinfo=UTC)


def _event(event_id: str, payload: dict[str, object]) -> TrackedEvent:
    return TrackedEvent(
        event_id=event_id,
        event_type="PaymentCaptured",
        schema_version=2,
        service="payments",
        service_version="3.1.0",
        deployment_id="payments-3.1.0-a1",
        occurred_at=OCCURRED,
        payload=payload,
        correlation_id="order-77",
        causation_id="evt-order-77",
        key="order-77",
        topic="shop.payments",
        partition=3,
        offset=4_242,
    )


def _compensation(event: TrackedEvent, key: str) -> CompensationRecord:
    return CompensationRecord(
        idempotency_key=key,
        event_id=event.event_id,
        saga="checkout",
        step="refund_payment",
        event_type=event.event_type,
        target_version=2,
        correlation_id=event.correlation_id,
        state=CompensationState.FAILED,
        attempts=5,
        last_error="gave up after 5 attempts: HTTP 503",
        confirm_type=None,
        confirm_deadline=None,
        next_attempt_at=None,
        skip_reason=None,
    )


async def test_an_exhausted_compensation_is_dead_lettered_with_its_event(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dlq_topic = unique_name("dlq")
    event_id = unique_name("evt")
    event = _event(event_id, {"amount": "12.50", "currency": "EUR", "lines": [1, 2]})
    compensation = _compensation(event, f"rb-1:{event_id}:refund_payment")

    ledger = await Ledger.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    publisher = KafkaPublisher(kafka_bootstrap)
    await publisher.start()
    try:
        dead_letters = DeadLetters(publisher, ledger, dlq_topic)
        await dead_letters.compensation_failed(
            "rb-1", compensation, event, "gave up after 5 attempts: HTTP 503"
        )
        [letter] = await read_topic(
            kafka_bootstrap, dlq_topic, what="the failed compensation's dead letter"
        )
        listed = await ledger.list_dead_letters()
    finally:
        await publisher.stop()
        await ledger.close()

    # The value is the event as it was tracked: a valid envelope, every field kept.
    envelope = EventEnvelope.model_validate_json(letter.value or b"")
    assert envelope.event_id == event_id
    assert envelope.payload == event.payload
    assert envelope.occurred_at == OCCURRED
    assert (envelope.correlation_id, envelope.causation_id, envelope.key) == (
        "order-77",
        "evt-order-77",
        "order-77",
    )
    assert letter.key == b"order-77"

    why = DeadLetter.from_headers(list(letter.headers))
    assert "refund_payment" in why.error
    assert event_id in why.error
    assert "HTTP 503" in why.error
    assert (why.source_topic, why.source_partition, why.source_offset) == (
        "shop.payments",
        3,
        4_242,
    )
    assert letter.header(IDEMPOTENCY_KEY_HEADER) == compensation.idempotency_key
    assert letter.header(ROLLBACK_ID_HEADER) == "rb-1"
    assert letter.header(COMPENSATES_HEADER) == event_id

    [row] = listed
    assert (row["topic"], row["partition"], row["offset"]) == ("shop.payments", 3, 4_242)
    assert "HTTP 503" in row["error"]


async def test_a_flood_of_bad_records_is_dead_lettered_in_order_and_all_kept(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    # A broken deployment can emit thousands of malformed records: the tracker
    # hands a batch's worth to `record_all`, which batches the produce and the
    # ledger copies instead of a round trip and a commit per record.
    dlq_topic = unique_name("dlq")
    count = 500
    records = [
        BadRecord(
            value=f'{{"n": {n}}}'.encode(),
            key=f"key-{n % 7}".encode(),
            # A forged header of ours is replaced by the real one.
            headers=[("trace", b"t"), ("backout-error", b"forged")] if n == 3 else [],
            error=f"bad record {n}",
            source_topic="shop.orders",
            source_partition=n % 4,
            source_offset=1_000 + n,
        )
        for n in range(count)
    ]
    ledger = await Ledger.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    publisher = KafkaPublisher(kafka_bootstrap)
    await publisher.start()
    try:
        await DeadLetters(publisher, ledger, dlq_topic).record_all(records, now=OCCURRED)
        letters = await read_topic(
            kafka_bootstrap, dlq_topic, count=count, what="every dead letter of the flood"
        )
        listed = await ledger.list_dead_letters(limit=count + 10)
    finally:
        await publisher.stop()
        await ledger.close()

    assert len(letters) == count
    by_offset = {}
    for letter in letters:
        why = DeadLetter.from_headers(list(letter.headers))
        by_offset[why.source_offset] = (why, letter)
    assert sorted(by_offset) == [1_000 + n for n in range(count)]
    for n in range(count):
        why, letter = by_offset[1_000 + n]
        assert why.error == f"bad record {n}"
        assert (why.source_topic, why.source_partition) == ("shop.orders", n % 4)
        assert letter.value == f'{{"n": {n}}}'.encode()
        assert letter.key == f"key-{n % 7}".encode()
    forged = by_offset[1_003][1]
    assert [v for name, v in forged.headers if name == "backout-error"] == [b"bad record 3"]
    assert forged.header("trace") == "t"
    # Records of one key share a partition of the DLQ topic, in the order given.
    for key in {letter.key for letter in letters}:
        offsets = [
            DeadLetter.from_headers(list(letter.headers)).source_offset
            for letter in sorted(letters, key=lambda r: r.offset)
            if letter.key == key
        ]
        assert offsets == sorted(offsets), key
    assert sorted(row["offset"] for row in listed) == [1_000 + n for n in range(count)]
    assert {row["error"] for row in listed} == {f"bad record {n}" for n in range(count)}
