"""The decoder's fast path never accepts what `EventEnvelope` would refuse, or change a value.

`consumers.decoding._fast_event` skips pydantic for plainly well-formed
envelopes (benchmarks: validation cost as much as the ledger insert). It must
be a strict subset of the contract: whenever it answers, pydantic accepts the
same document with the very same field values; when in doubt it answers None
and pydantic decides (and words the error).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.decoding import EventDecoder, _fast_event
from sagas.ledger import TrackedEvent
from sagas.registry import SagaRegistry
from schemas.envelope import EventEnvelope
from tests.support.contract import ENVELOPE_OPTIONAL, ENVELOPE_REQUIRED

FIELDS = (*ENVELOPE_REQUIRED, *ENVELOPE_OPTIONAL)

GOOD: dict[str, Any] = {
    "event_id": "e-1",
    "event_type": "OrderPlaced",
    "schema_version": 2,
    "service": "orders",
    "service_version": "2.4.0",
    "deployment_id": "orders-2.4.0-7f3a",
    "occurred_at": "2026-01-31T12:00:00.123456+02:00",
    "correlation_id": "o-1",
    "causation_id": None,
    "key": "o-1",
    "payload": {"order_id": "o-1", "lines": [{"sku": "a", "qty": 2}]},
}

_text = st.one_of(
    st.text(max_size=3),
    st.text(min_size=254, max_size=257),
    st.sampled_from(["", " ", "x", "\ud800", "é", "a" * 255, "a" * 256, "٣"]),
)
_times = st.one_of(
    st.sampled_from(
        [
            "2026-01-31T12:00:00Z",
            "2026-01-31T12:00:00+00:00",
            "2026-01-31T12:00:00-00:00",
            "2026-01-31T12:00:00.1Z",
            "2026-01-31T12:00:00.1234567Z",
            "2026-01-31T12:00:00",
            "2026-01-31 12:00:00Z",
            "2026-01-31t12:00:00z",
            "2026-02-30T12:00:00Z",
            "2026-01-31T24:00:00Z",
            "2026-01-31T23:59:60Z",
            "2026-01-31T12:00:00+24:00",
            "2026-01-31T12:00:00+23:59",
            "2026-W05-6T12:00:00Z",
            "20260131T120000Z",
            "٢٠٢٦-01-31T12:00:00Z",
            "1700000000",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00Z",
        ]
    ),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=2_000_000),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(_text, st.integers(), max_size=3),
)
_overrides = st.dictionaries(
    st.sampled_from(FIELDS),
    st.one_of(_values, _times),
    max_size=4,
)
_removals = st.sets(st.sampled_from(FIELDS), max_size=3)


def _fast(document: dict[str, Any]) -> TrackedEvent | None:
    return _fast_event(document, "t.events", 1, 5, None, None)


def _same(document: dict[str, Any]) -> None:
    fast = _fast(document)
    if fast is None:
        return  # pydantic decides: nothing to compare
    envelope = EventEnvelope.model_validate(document)  # must not raise
    for name in FIELDS:
        assert getattr(fast, name) == getattr(envelope, name), name
    assert fast.occurred_at.tzinfo is not None
    assert fast.occurred_at.utcoffset() == envelope.occurred_at.utcoffset()


@settings(max_examples=600, deadline=None)
@given(_overrides, _removals)
def test_the_fast_path_only_takes_what_pydantic_takes_unchanged(
    overrides: dict[str, Any], removals: set[str]
) -> None:
    document = {**GOOD, **overrides}
    for name in removals:
        document.pop(name, None)
    _same(document)


def test_a_plain_envelope_takes_the_fast_path() -> None:
    fast = _fast(dict(GOOD))
    assert fast is not None
    assert fast.occurred_at.isoformat() == "2026-01-31T10:00:00.123456+00:00"


def test_the_decoder_gives_the_same_event_either_way() -> None:
    decoder = EventDecoder(SagaRegistry(), track_unknown=True)
    raw = json.dumps(GOOD).encode()
    tracked = decoder.decode(raw, [], topic="t.events", partition=1, offset=5)
    assert isinstance(tracked, TrackedEvent)
    envelope = EventEnvelope.model_validate(GOOD)
    for name in FIELDS:
        assert getattr(tracked, name) == getattr(envelope, name), name


# JSON values with what orjson and the standard library treat differently:
# integers beyond 64 bits (orjson makes them floats), long mantissas, NaN and
# infinities, lone surrogates, deep nesting.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.sampled_from(["\ud800", "\x00", "é"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)
_raw = st.sampled_from(
    [
        "NaN",
        "[Infinity]",
        "1e999",
        "-9223372036854775809",
        "18446744073709551616",
        "0.12345678901234567890123",
        '"\\ud800"',
        "[" * 2000 + "]" * 2000,
        '{"a": 1, "a": 2}',
        "01",
        "1.",
        " {} ",
        "\ufeff{}",
        '{"a": "\\u0000"}',
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_values.map(json.dumps), _raw))
def test_parsing_gives_what_the_standard_library_gives(text: str) -> None:
    from consumers.decoding import _JSON, _parse

    try:
        expected: Any = ("value", _JSON.decode(text))
    except (ValueError, RecursionError) as exc:
        expected = ("error", type(exc), str(exc))
    try:
        got: Any = ("value", _parse(text.encode("utf-8", "surrogatepass"), text))
    except (ValueError, RecursionError) as exc:
        got = ("error", type(exc), str(exc))
    assert got == expected
    if got[0] == "value":  # the same types too: 1 and 1.0 compare equal
        assert json.dumps(got[1]) == json.dumps(expected[1])
