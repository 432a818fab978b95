"""Bad input: hostile records on tracked topics and on the signal topic.

DESIGN §2 and §4 ("Tracking"): every envelope is validated; invalid records
go to the DLQ with a readable `backout-error` and their source
topic/partition/offset; the worker keeps going. Here a real worker gets a
storm of hand-written traps and hypothesis-generated records (see
`tests.support.nasty`) interleaved with good ones, and must stay alive and
healthy, dead-letter exactly the bad ones, track exactly the good ones, and
keep working afterwards (including a rollback over a causation cycle).

The decoder itself is also checked without a broker: any bytes give a
tracked event or a reason, never an exception.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import multiprocessing
import os
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.decoding import EventDecoder, Rejected
from sagas.ledger import TrackedEvent
from sagas.registry import load_registry
from schemas.dlq import (
    ERROR_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from tests.reliability.conftest import report
from tests.support import nasty
from tests.support.kafka import Record, read_topic
from tests.support.nasty import Events, Nasty, Pools, Sent, Signals, Target, targets

__all__ = ["targets"]  # the fixture, imported for pytest

DECODER = EventDecoder(load_registry(["tests.support.e2e_saga"]))
DLQ_HEADERS = (ERROR_HEADER, SOURCE_TOPIC_HEADER, SOURCE_PARTITION_HEADER, SOURCE_OFFSET_HEADER)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MakeTarget = Callable[..., Awaitable[Target]]


def decode(value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> Any:
    return DECODER.decode(value, headers or [], topic="t.events", partition=3, offset=7)


# ------------------------------------------------------------ the decoder alone


def _never_raises(value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
    result = decode(value, headers)
    assert isinstance(result, TrackedEvent | Rejected)
    if isinstance(result, Rejected):
        assert result.reason.strip(), f"empty reason for {value!r}"


def _corrupt(raw: bytes, how: str, at: int) -> bytes:
    where = at % (len(raw) + 1)
    return {
        "as-is": raw,
        "truncate": raw[:where],
        "flip": raw[:where] + bytes([raw[where] ^ 0x80]) + raw[where + 1 :] if raw[where:] else raw,
        "nul": raw[:where] + b"\x00" + raw[where:],
        "garbage": raw + b"\xff}",
        "utf16": raw.decode().encode("utf-16"),
    }[how]


_ANY_RECORD = st.one_of(st.none(), st.binary(max_size=2000), nasty.garbage)
_JSONISH = st.tuples(
    st.one_of(nasty.good_envelopes(), nasty.bad_envelopes(), nasty.json_values).map(nasty.dumps),
    st.sampled_from(["as-is", "truncate", "flip", "nul", "garbage", "utf16"]),
    st.integers(min_value=0, max_value=10_000),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_ANY_RECORD, headers=nasty.header_lists)
def test_any_bytes_decode_to_an_event_or_a_reason(
    value: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    _never_raises(value, headers)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_JSONISH, headers=nasty.header_lists)
def test_corrupted_json_decodes_to_an_event_or_a_reason(
    case: tuple[bytes, str, int], headers: list[tuple[str, bytes]]
) -> None:
    raw, how, at = case
    _never_raises(_corrupt(raw, how, at), headers)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    value=st.one_of(_ANY_RECORD, _JSONISH.map(lambda c: _corrupt(*c))), headers=nasty.header_lists
)
def test_any_bytes_decode_to_an_event_or_a_reason_long(
    value: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    _never_raises(value, headers)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=nasty.bad_envelopes())
def test_envelopes_broken_against_the_contract_are_rejected(document: Any) -> None:
    result = decode(nasty.dumps(document))
    assert isinstance(result, Rejected), f"tracked although broken: {document!r}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=nasty.good_envelopes())
def test_good_envelopes_round_trip(document: dict[str, Any]) -> None:
    """Decoded fields equal what was sent; re-encoding the event decodes to the same event."""
    event = decode(nasty.dumps(document), [("traceparent", TRACEPARENT.encode())])
    assert isinstance(event, TrackedEvent), getattr(event, "reason", event)
    for name in ("event_id", "event_type", "schema_version", "service", "service_version"):
        assert getattr(event, name) == document[name], name
    assert event.deployment_id == document["deployment_id"]
    for name in ("correlation_id", "causation_id", "key"):
        assert getattr(event, name) == document.get(name), name
    assert event.payload == document["payload"]
    assert event.occurred_at == datetime.fromisoformat(document["occurred_at"])
    assert event.occurred_at.utcoffset() is not None
    assert not event.occurred_at.utcoffset()
    assert (event.topic, event.partition, event.offset) == ("t.events", 3, 7)
    assert event.traceparent == TRACEPARENT

    again = {
        **{k: getattr(event, k) for k in nasty.REQUIRED if k != "occurred_at"},
        "occurred_at": event.occurred_at.isoformat(),
        **{k: getattr(event, k) for k in ("correlation_id", "causation_id", "key")},
    }
    assert decode(nasty.dumps(again), [("traceparent", TRACEPARENT.encode())]) == event


def test_every_hand_written_record_is_classified_as_the_corpus_says() -> None:
    """Good kinds decode to their event; bad kinds are refused with the expected reason."""
    ev = Events("corpus", random.Random(0))
    for kind, make in nasty.GOOD_EVENTS.items():
        for record in make(ev):
            result = decode(record.value, list(record.headers))
            assert isinstance(result, TrackedEvent), f"{kind}: {result}"
            assert result.event_id == record.event_id, kind
    for kind, make in nasty.BAD_EVENTS.items():
        for record in make(ev):
            result = decode(record.value, list(record.headers))
            assert isinstance(result, Rejected), f"{kind} was accepted"
            assert nasty.expected_reason(kind) in result.reason, f"{kind}: {result.reason}"
    print(
        f"corpus: {len(nasty.GOOD_EVENTS)} good kinds, {len(nasty.BAD_EVENTS)} bad event kinds, "
        f"{len(nasty.BAD_SIGNALS)} bad signal kinds"
    )


# ------------------------------------------------------------------ the storm


def _invalid_id(sent: Sent) -> str:
    """The rollback id the worker gives a signal that names none."""
    return f"invalid-{sent.topic}-{sent.partition}-{sent.offset}"


def _rollback_id(sent: Sent) -> str:
    return sent.record.signal_id or _invalid_id(sent)


def _check_dead_letter(letter: Record, sent: Sent) -> None:
    """Original bytes and headers, one of each `backout-*` header, a readable reason."""
    record = sent.record
    where = f"{record.kind} @ {sent.source}"
    ours = [(n, v) for n, v in letter.headers if n in DLQ_HEADERS]
    assert sorted(n for n, _ in ours) == sorted(DLQ_HEADERS), f"{where}: {ours}"
    if record.kind in nasty.TOO_LARGE_FOR_DLQ:
        assert (letter.value, letter.key) == (b"", None), where
        assert len(letter.headers) == len(DLQ_HEADERS), where
        assert "too large to keep in the DLQ" in dict(ours)[ERROR_HEADER].decode(), where
    else:
        assert letter.value == record.value, f"{where}: the DLQ record lost the original bytes"
        assert letter.key == record.key, where
        original = [(n, v) for n, v in record.headers if n not in DLQ_HEADERS]
        assert [(n, v) for n, v in letter.headers if n not in DLQ_HEADERS] == original, where
    raw_error = dict(ours)[ERROR_HEADER]
    error = raw_error.decode("utf-8")  # strict: a readable reason is valid text
    assert error.strip(), f"{where}: empty reason"
    assert len(error) <= 2000, f"{where}: {error!r}"
    expected = nasty.expected_reason(record.kind)
    if expected:
        assert expected in error, f"{where}: {error!r} lacks {expected!r}"
    elif record.kind.startswith("sig"):
        assert error.startswith("rejected signal: "), f"{where}: {error!r}"
    else:
        assert any(p in error for p in nasty.READABLE_REASONS), f"{where}: {error!r}"


async def _cycle_rollback(target: Target, ev: Events, signals: Signals) -> dict[str, Any]:
    """Events whose causation ids form a cycle are tracked; a rollback over them ends."""
    deployment = f"{target.tag}-cycle-9.9"
    ids = [ev.next_id("cycle") for _ in range(3)]
    records = [
        ev.good(
            "causation/cycle-rollback",
            ev.document("Reserved", event_id=i, causation_id=ids[n - 1], deployment_id=deployment),
        )
        for n, i in enumerate(ids)
    ]
    await nasty.produce(target.bootstrap, [(target.events_topic("stock"), r) for r in records])
    await nasty.wait_tracked(target, ids, timeout=30)

    signal = signals.record("sig/cycle", signals.document(deployment_id=deployment), good=True)
    await nasty.produce(target.bootstrap, [(target.signals_topic, signal)])
    rollback_id = signal.signal_id

    def finished(records: list[Record]) -> bool:
        return any(
            r.json()["rollback_id"] == rollback_id
            and r.json()["state"] in ("completed", "failed", "rejected")
            for r in records
        )

    statuses = await nasty.read_until(
        target.bootstrap,
        target.status_topic,
        finished,
        timeout=60,
        what=lambda _r: f"rollback {rollback_id} over a causation cycle did not end",
    )
    final: dict[str, Any] = next(
        r.json() for r in reversed(statuses) if r.json()["rollback_id"] == rollback_id
    )
    assert final["state"] == "completed", final
    assert (final["planned"], final["applied"]) == (3, 3), final
    commands = await read_topic(
        target.bootstrap,
        target.command_topic("stock"),
        lambda r: r.rollback_id == rollback_id,
        count=3,
        what="release commands of the cycle rollback",
    )
    assert sorted(c.compensates or "" for c in commands) == sorted(ids)
    return final


async def run_storm(make: MakeTarget, ledger_url: str, count: int, pool_size: int) -> None:
    seed = int(os.environ.get("BACKOUT_FUZZ_SEED") or random.randrange(2**32))
    print(f"fuzz: seed {seed} (BACKOUT_FUZZ_SEED={seed} replays the same mix), {count} records")
    rng = random.Random(seed)
    # Hypothesis harvests while the worker starts, in a process of its own:
    # in a thread it would see aiokafka's use of `random` as its own.
    started = time.monotonic()
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        harvesting = asyncio.get_running_loop().run_in_executor(
            pool, Pools.harvest, pool_size, seed
        )
        target = await make(ledger_url)
        pools = await harvesting
    harvested = time.monotonic() - started
    ev, signals = Events(target.tag, rng), Signals(target.tag)
    topics = [target.events_topic(s) for s in ("orders", "payments", "stock")]

    # A deployment tracked before the storm, for the good (dry-run) signals to plan.
    warm = [ev.good("warm-up", ev.document(deployment_id=ev.deployments[0])) for _ in range(3)]
    await nasty.produce(target.bootstrap, [(topics[0], r) for r in warm])
    await nasty.wait_tracked(target, [r.event_id or "" for r in warm], timeout=30)

    def good_signal() -> Nasty:
        document = signals.document(deployment_id=ev.deployments[0], dry_run=True)
        return signals.record("sig/good-dry-run", document, good=True)

    plan = nasty.storm(
        ev,
        signals,
        pools,
        count,
        event_topics=topics,
        signal_topic=target.signals_topic,
        good_signal=good_signal,
    )
    async with nasty.HealthWatch(target.worker) as health:
        started = time.monotonic()
        sent = await nasty.produce(target.bootstrap, plan)
        produced = time.monotonic() - started

        good_events = [s for s in sent if s.record.good and s.topic != target.signals_topic]
        sent_signals = [s for s in sent if s.topic == target.signals_topic]
        bad = {s.source: s for s in sent if not s.record.good}
        assert len(bad) == sum(1 for s in sent if not s.record.good), "two records, one offset?"
        timeout = 60 + count / 50

        tracking = await nasty.wait_tracked(
            target, [s.record.event_id or "" for s in good_events], timeout=timeout
        )

        def source_of(record: Record) -> tuple[str, int, int]:
            found = {n: v.decode("utf-8", "replace") for n, v in record.headers}
            return (
                found.get(SOURCE_TOPIC_HEADER, ""),
                int(found.get(SOURCE_PARTITION_HEADER, "-1")),
                int(found.get(SOURCE_OFFSET_HEADER, "-1")),
            )

        def all_dead(records: list[Record]) -> bool:
            return len(records) >= len(bad) and set(bad) <= {source_of(r) for r in records}

        def missing_letters(records: list[Record]) -> str:
            lacking = set(bad) - {source_of(r) for r in records}
            kinds = collections.Counter(bad[s].record.kind for s in lacking)
            return f"{len(lacking)} of {len(bad)} bad records not dead-lettered: {kinds}"

        letters = await nasty.read_until(
            target.bootstrap, target.dlq_topic, all_dead, timeout=timeout, what=missing_letters
        )
        expected_states = {
            _rollback_id(s): ("planned" if s.record.good else "rejected") for s in sent_signals
        }

        def states_of(records: list[Record]) -> dict[str, set[str]]:
            states: dict[str, set[str]] = collections.defaultdict(set)
            for record in records:
                document = record.json()
                states[document["rollback_id"]].add(document["state"])
            return states

        def all_answered(records: list[Record]) -> bool:
            states = states_of(records)
            return all(state in states.get(i, ()) for i, state in expected_states.items())

        def unanswered(records: list[Record]) -> str:
            states = states_of(records)
            lacking = {i: s for i, s in expected_states.items() if s not in states.get(i, ())}
            return f"{len(lacking)} signals without their status, e.g. {list(lacking.items())[:5]}"

        statuses = await nasty.read_until(
            target.bootstrap, target.status_topic, all_answered, timeout=timeout, what=unanswered
        )
        settled = time.monotonic() - started

    # The worker lived through it, healthy on every poll.
    health.check()
    assert target.worker.running
    assert "Traceback" not in target.worker.log_since_start(), target.worker.log_tail(120)

    # Exactly the bad records are in the DLQ, each once, each as the contract says.
    by_source = collections.defaultdict(list)
    for letter in letters:
        by_source[source_of(letter)].append(letter)
    strays = set(by_source) - set(bad)
    assert not strays, f"dead letters of good records: {[str(by_source[s][0]) for s in strays]}"
    # Once each, unless a rebalance made the tracker re-read uncommitted records
    # (at-least-once; a join per consumer group at start is normal).
    twice = {s: len(v) for s, v in by_source.items() if len(v) > 1}
    rejoins = target.worker.log_since_start().count("(Re-)joining group") - 2
    assert not twice or rejoins > 0, f"records dead-lettered more than once: {twice}"
    for source, sent_record in bad.items():
        _check_dead_letter(by_source[source][0], sent_record)

    # Exactly the good records are in the ledger.
    async with target.ledger() as ledger:
        tracked = await ledger.count_events()
    assert tracked == len(good_events) + len(warm), "bad records were tracked (or good ones lost)"

    # Every signal answered: rejected with a reason, or planned (the good dry runs).
    errors = {
        r.json()["rollback_id"]: r.json()["error"]
        for r in statuses
        if r.json()["state"] == "rejected"
    }
    for s in sent_signals:
        if not s.record.good:
            assert errors.get(_rollback_id(s)), f"{s.record.kind}: rejected without a reason"

    # And it keeps working: new events are tracked, a rollback over a cycle ends.
    final = await _cycle_rollback(target, ev, signals)
    health_after = await target.worker.get("/health")
    assert health_after["status"] == "ok"

    families = collections.Counter(s.record.family for s in sent if not s.record.good)
    bad_signals = sum(1 for s in sent_signals if not s.record.good)
    backend = ledger_url.split(":")[0]
    report(
        f"fuzz [{backend}] seed {seed}: {len(sent)} records sent in {produced:.1f}s, all settled "
        f"{settled:.1f}s after the first send (tracking {tracking:.1f}s); {harvested:.1f}s to "
        f"start the worker and harvest {pool_size} hypothesis examples per strategy, in parallel"
    )
    report(
        f"  good events tracked: {len(good_events)} (+{len(warm)} warm-up; ledger: {tracked}); "
        f"bad records dead-lettered: {len(bad)} ({len(bad) - bad_signals} events, "
        f"{bad_signals} signals; {len(twice)} twice after {max(rejoins, 0)} rebalances)"
    )
    report(f"  dead letters by family: {dict(families.most_common())}")
    report(
        f"  signals: {len(sent_signals)} ({len(sent_signals) - bad_signals} good dry runs "
        f"planned, {len(errors)} rejected with a reason); health polls: {health.polls}, all 200; "
        f"cycle rollback {final['state']} ({final['applied']}/{final['planned']} applied)"
    )


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_storm_of_bad_records_leaves_the_worker_tracking(
    targets: MakeTarget, ledger_url: str
) -> None:
    """~1,500 records, about half of them hostile; both ledger backends."""
    await run_storm(targets, ledger_url, count=1500, pool_size=150)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_storm_of_bad_records_leaves_the_worker_tracking_long(
    targets: MakeTarget, ledger_url: str
) -> None:
    """10,000+ records; both ledger backends."""
    await run_storm(targets, ledger_url, count=10_000, pool_size=1000)
