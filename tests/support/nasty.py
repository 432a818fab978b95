"""Nasty records: what a broken or hostile producer puts on Backout's topics.

Three sources, each record labelled with what must become of it:

- hand-written makers (`BAD_EVENTS`, `GOOD_EVENTS`, `BAD_SIGNALS`), one per
  trap: invalid UTF-8, not JSON, deep nesting, 1 MiB boundaries, wrong types,
  missing fields, times out of range, huge ids, SQL-looking strings, unknown
  schema versions, causation cycles, NUL bytes, nulls, empty records, garbage
  headers...;
- hypothesis strategies (`good_envelopes`, `bad_envelopes`, `garbage`,
  `bad_signal_documents`), harvested into pools with `harvest`;
- `storm`, which interleaves all of them with good records.

A *good* event must be tracked (its `event_id` ends up in the ledger); every
other record must land in the DLQ. The tests use the saga module
`tests.support.e2e_saga`: `ItemOrdered` v1/v2 have payload models, `Charged`
and `Reserved` are compensated from plain dicts, `Emailed` is manual,
`Viewed` ignored, `ItemCancelled`/`Refunded` are confirmations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from consumers.decoding import MAX_NESTING, MAX_RECORD_BYTES
from sagas.ledger import Ledger
from tests.support.contract import ENVELOPE_OPTIONAL
from tests.support.contract import ENVELOPE_REQUIRED as REQUIRED
from tests.support.e2e_worker import WorkerTopics, service_topics, worker_env
from tests.support.kafka import Record, ensure_topics, read_topic
from tests.support.names import unique_name
from tests.support.worker import WorkerProcess

_T = TypeVar("_T")

# Values each field must refuse (pydantic's lax mode accepts "1" and 1.0 for
# an int, so those are not here). `None` is fine for the optional ids.
_BAD_STRING = [None, 0, 1.5, True, [], {}, "", "x" * 256, ["id"], {"id": 1}]
INVALID: dict[str, list[Any]] = {
    "event_id": _BAD_STRING,
    "event_type": _BAD_STRING,
    "service": _BAD_STRING,
    "service_version": _BAD_STRING,
    "deployment_id": _BAD_STRING,
    "schema_version": [None, 0, -1, 1_000_001, 2**70, "two", "1.5", 1.5, [], {}, ""],
    "occurred_at": [
        None,
        "",
        "yesterday",
        "2024-01-01T00:00:00",  # no offset
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        10**20,
        [],
        {},
    ],
    "payload": [None, [], "payload", 1, True, [{"order_id": "o"}]],
    "correlation_id": ["", 0, [], {}, "c" * 256],
    "causation_id": ["", 0, [], {}, "c" * 256],
    "key": ["", 0, [], {}, "k" * 256],
}
DICT_TYPES = ("Charged", "Reserved", "Emailed", "Viewed", "ItemCancelled", "Refunded")
SQL = ["'; DROP TABLE events; --", "x' OR '1'='1", 'Robert"); DELETE FROM rollbacks; --']
_NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))


@dataclass(frozen=True, slots=True)
class Nasty:
    """One record to send, and what must become of it.

    Attributes:
        kind: what trap it is, e.g. ``"utf8/ff-prefix"`` (figures group by it).
        good: an event that must be tracked, or a signal that must be accepted.
        event_id: of a good event: the id the ledger must hold.
        signal_id: of a signal: the rollback id its status must carry (None:
            the worker makes one up from where the record landed).
    """

    kind: str
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    good: bool = False
    event_id: str | None = None
    signal_id: str | None = None

    @property
    def family(self) -> str:
        """The kind up to its first slash: ``"utf8"``."""
        return self.kind.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class Sent:
    """A record as it landed on the broker."""

    record: Nasty
    topic: str
    partition: int
    offset: int

    @property
    def source(self) -> tuple[str, int, int]:
        """(topic, partition, offset): what the DLQ's source headers must say."""
        return self.topic, self.partition, self.offset


def dumps(document: Any) -> bytes:
    """JSON bytes as a producer would send them (NaN allowed: Python emits it)."""
    return json.dumps(document).encode()


def nested(levels: int) -> Any:
    """`levels` nested lists: ``[[[]]]`` for 3."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


# ------------------------------------------------------------------------ builders


class Events:
    """Envelopes of one test: ids and deployments of its own.

    Args:
        tag: unique prefix of every id.
        rng: the test's random source (seeded; the seed is printed).
    """

    def __init__(self, tag: str, rng: random.Random) -> None:
        self.tag = tag
        self.rng = rng
        self._count = 0
        # Deployment 0 is tracked before a storm starts: signals may name it.
        self.deployments = [f"{tag}-orders-2.{i}" for i in range(3)]

    def next_id(self, label: str = "e") -> str:
        """A new unique id."""
        self._count += 1
        return f"{self.tag}-{label}-{self._count}"

    def document(self, event_type: str = "Charged", **fields: Any) -> dict[str, Any]:
        """A valid envelope of `event_type` (v2 for ItemOrdered), then `fields` applied."""
        event_id = self.next_id()
        order = f"o-{event_id}"
        if event_type == "ItemOrdered":
            version, payload = 2, {"order_id": order, "quantity": self.rng.randint(1, 9)}
        else:
            version, payload = 1, {"order_id": order, "amount": self.rng.randint(1, 10_000)}
        document: dict[str, Any] = {
            "event_id": event_id,
            "event_type": event_type,
            "schema_version": version,
            "service": "orders",
            "service_version": "2.0",
            "deployment_id": self.rng.choice(self.deployments),
            "occurred_at": datetime.now(UTC).isoformat(),
            "correlation_id": order,
            "payload": payload,
        }
        document.update(fields)
        return document

    def good(
        self, kind: str, document: dict[str, Any], headers: Iterable[tuple[str, bytes]] = ()
    ) -> Nasty:
        """A record that must be tracked."""
        key = document.get("key") or document.get("correlation_id")
        return Nasty(
            kind,
            dumps(document),
            key=key.encode() if isinstance(key, str) else None,
            headers=tuple(headers),
            good=True,
            event_id=document["event_id"],
        )

    def bad(
        self,
        kind: str,
        value: bytes | dict[str, Any] | list[Any] | None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> Nasty:
        """A record that must be dead-lettered."""
        raw = value if isinstance(value, bytes) or value is None else dumps(value)
        return Nasty(kind, raw, key=self.next_id("k").encode(), headers=tuple(headers))

    def padded(self, size: int) -> bytes:
        """A valid Charged envelope of exactly `size` bytes."""
        document = self.document(payload={"order_id": "o", "filler": ""})
        base = len(dumps(document))
        document["payload"]["filler"] = "x" * (size - base)
        raw = dumps(document)
        assert len(raw) == size
        return raw


Maker = Callable[[Events], list[Nasty]]
GOOD_EVENTS: dict[str, Maker] = {}
BAD_EVENTS: dict[str, Maker] = {}
# Makers of records over ~1 MB: a storm uses each only a few times.
HEAVY: set[str] = set()


def _good(kind: str, heavy: bool = False) -> Callable[[Callable[[Events], Any]], Maker]:
    def register(make: Callable[[Events], Any]) -> Maker:
        def maker(ev: Events) -> list[Nasty]:
            made = make(ev)
            if isinstance(made, Nasty):
                return [made]
            if isinstance(made, list):
                return made
            return [ev.good(kind, made)]

        GOOD_EVENTS[kind] = maker
        if heavy:
            HEAVY.add(kind)
        return maker

    return register


def _bad(kind: str, heavy: bool = False) -> Callable[[Callable[[Events], Any]], Maker]:
    def register(make: Callable[[Events], Any]) -> Maker:
        def maker(ev: Events) -> list[Nasty]:
            made = make(ev)
            return [made] if isinstance(made, Nasty) else [ev.bad(kind, made)]

        BAD_EVENTS[kind] = maker
        if heavy:
            HEAVY.add(kind)
        return maker

    return register


# ------------------------------------------------------------------ good events

for _type in ("ItemOrdered", *DICT_TYPES):
    _good(f"plain/{_type}")(lambda ev, t=_type: ev.document(t))
_good("plain/ItemOrdered-v1-upcast")(
    lambda ev: ev.document("ItemOrdered", schema_version=1, payload={"order": ev.next_id("o")})
)
_good("ids/255-chars")(lambda ev: ev.document(event_id=ev.next_id().ljust(255, "z")))
_good("ids/255-astral")(lambda ev: ev.document(event_id=ev.next_id() + "🦄" * 200))
_good("ids/whitespace-and-controls")(lambda ev: ev.document(event_id=f" \t{ev.next_id()}\n\x7f"))
_good("ids/sql")(lambda ev: ev.document(event_id=ev.next_id() + SQL[0], key=SQL[2]))
_good("ids/sql-deployment")(lambda ev: ev.document(deployment_id=f"{ev.tag}{SQL[1]}"))
_good("payload/sql")(lambda ev: ev.document(payload={"order_id": SQL[0], SQL[1]: SQL[2]}))
_good("payload/unicode")(
    lambda ev: ev.document(payload={"order_id": "\u202eevil\u200b", "😀": ["ß", "\U0010ffff"]})
)
# JSON escapes of lone surrogates: valid JSON, no valid UTF-8 once decoded.
_good("payload/lone-surrogate")(lambda ev: ev.document(payload={"s": "\ud800", "t": "\udfff"}))
_good("payload/big-numbers")(
    lambda ev: ev.document(payload={"big": 10**300, "neg": -(10**4000), "f": 1.7e308, "t": 5e-324})
)
_good("payload/nulls")(lambda ev: ev.document(payload={"order_id": None, "x": [None, {}]}))
_good("payload/empty")(lambda ev: ev.document("Reserved", payload={}))
_good("payload/nested-to-the-limit")(
    # envelope (1) > payload (2) > lists: exactly MAX_NESTING levels.
    lambda ev: ev.document(payload={"deep": nested(MAX_NESTING - 2)})
)
_good("size/exactly-1MiB", heavy=True)(
    lambda ev: Nasty(
        "size/exactly-1MiB",
        raw := ev.padded(MAX_RECORD_BYTES),
        good=True,
        event_id=json.loads(raw)["event_id"],
    )
)
_good("time/ancient")(lambda ev: ev.document(occurred_at="0001-01-01T00:00:00Z"))
_good("time/far-future")(lambda ev: ev.document(occurred_at="9999-12-31T23:59:59.999999Z"))
_good("time/odd-offset")(lambda ev: ev.document(occurred_at="2024-02-29T23:59:59.5+14:00"))
_good("fields/null-optionals")(
    lambda ev: ev.document(correlation_id=None, causation_id=None, key=None)
)
_good("fields/extra-unknown")(
    lambda ev: ev.document(extra={"a": nested(10)}, sagas="os", __class__="x", _private=1)
)
_good("causation/self")(lambda ev: ev.document(event_id=(i := ev.next_id()), causation_id=i))


@_good("causation/cycle")
def _cycle(ev: Events) -> list[Nasty]:
    first, second = ev.next_id(), ev.next_id()
    return [
        ev.good("causation/cycle", ev.document("Reserved", event_id=first, causation_id=second)),
        ev.good("causation/cycle", ev.document("Charged", event_id=second, causation_id=first)),
    ]


_GARBAGE_HEADERS = [
    ("traceparent", b"00-\x00\x00\x00-\xff\xfe-01"),
    ("tracestate", bytes(range(256))),
    ("traceparent", b"not-a-traceparent"),
    ("", b""),
    ("x-binary", b"\xff\x00\xfe"),
    ("x-binary", b""),
    ("ünïcødé-名前", "值".encode()),
    ("backout-error", b"forged"),
    ("backout-source-offset", b"-42"),
]
_good("headers/garbage")(lambda ev: ev.good("headers/garbage", ev.document(), _GARBAGE_HEADERS))
_good("headers/huge-trace-context")(
    lambda ev: ev.good(
        "headers/huge-trace-context",
        ev.document(),
        [("traceparent", b"0" * 1000), ("tracestate", b"k=v," * 4000)],
    )
)
_good("headers/nul-tracestate")(
    lambda ev: ev.good(
        "headers/nul-tracestate",
        ev.document(),
        [
            ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
            ("tracestate", b"a=\x00"),
        ],
    )
)
_good("key/binary")(
    lambda ev: Nasty(
        "key/binary",
        dumps(d := ev.document()),
        key=b"\x00\xff" * 50,
        good=True,
        event_id=d["event_id"],
    )
)

# ------------------------------------------------------------------- bad events

_bad("utf8/ff-prefix")(lambda ev: b"\xff\xfe" + dumps(ev.document()))
_bad("utf8/latin1-in-string")(
    lambda ev: dumps(ev.document(service="caf\u00e9")).replace(b"\\u00e9", b"\xe9")
)
_bad("utf8/truncated-multibyte")(lambda ev: dumps(ev.document())[:-2] + b'"\xe2\x82"}')
_bad("utf8/overlong-slash")(
    lambda ev: dumps(ev.document()).replace(b"/", b"\xc0\xaf") + b"\xc0\xaf"
)
_bad("utf8/encoded-surrogate")(lambda ev: dumps(ev.document())[:-1] + b',"s":"\xed\xa0\x80"}')
_bad("utf8/utf16-envelope")(lambda ev: json.dumps(ev.document()).encode("utf-16"))
_bad("json/plain-text")(lambda ev: b"hello, this is not an event")
_bad("json/truncated")(lambda ev: dumps(ev.document())[:57])
_bad("json/trailing-garbage")(lambda ev: dumps(ev.document()) + b" }{")
_bad("json/python-repr")(lambda ev: repr(ev.document()).encode())
_bad("json/bom")(lambda ev: b"\xef\xbb\xbf" + dumps(ev.document()))
_bad("json/nan")(lambda ev: ev.document(payload={"order_id": "o", "x": float("nan")}))
_bad("json/infinity")(lambda ev: ev.document(payload={"order_id": "o", "x": float("-inf")}))
_bad("json/1e999")(lambda ev: dumps(ev.document())[:-2] + b', "x": 1e999}}')
_bad("json/int-over-4300-digits")(
    lambda ev: dumps(ev.document())[:-2] + b', "x": ' + b"9" * 5000 + b"}}"
)
_bad("nul/raw-byte")(lambda ev: dumps(ev.document(service="a\x00b")).replace(b"\\u0000", b"\x00"))
_bad("nul/escaped-in-payload")(lambda ev: ev.document(payload={"order_id": "o\x00"}))
_bad("nul/escaped-in-id")(lambda ev: ev.document(event_id=ev.next_id() + "\x00"))
_bad("nul/between-tokens")(lambda ev: dumps(ev.document()).replace(b",", b",\x00", 1))
_bad("empty/null-value")(lambda ev: None)
_bad("empty/zero-bytes")(lambda ev: b"")
_bad("empty/whitespace")(lambda ev: b" \n\t ")
_bad("empty/object")(lambda ev: {})
_bad("shape/array")(lambda ev: [ev.document()])
_bad("shape/string")(lambda ev: b'"an event"')
_bad("shape/number")(lambda ev: b"42")
_bad("shape/json-null")(lambda ev: b"null")
_bad("shape/true")(lambda ev: b"true")
_bad("depth/over-the-limit")(lambda ev: ev.document(payload={"deep": nested(MAX_NESTING - 1)}))
_bad("depth/past-the-parser")(lambda ev: b'{"payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
_bad("depth/dicts-past-the-parser")(lambda ev: b'{"a":' * 5000 + b"1" + b"}" * 5000)
_bad("depth/in-unknown-field")(lambda ev: ev.document(extra=nested(MAX_NESTING + 5)))
_bad("size/1MiB-plus-1", heavy=True)(lambda ev: ev.padded(MAX_RECORD_BYTES + 1))
_bad("size/1.5MB", heavy=True)(lambda ev: ev.padded(1_500_000))
# Over the worker's 4 MiB producer limit: dead-lettered without its bytes.
_bad("size/5MB", heavy=True)(lambda ev: ev.padded(5_000_000))
for _field in REQUIRED:
    _bad(f"missing/{_field}")(
        lambda ev, f=_field: {k: v for k, v in ev.document().items() if k != f}
    )
for _field, _values in INVALID.items():
    for _index, _value in enumerate(_values):
        _bad(f"invalid/{_field}/{_index}")(lambda ev, f=_field, v=_value: ev.document(**{f: v}))
_bad("ids/10k-chars")(lambda ev: ev.document(event_id="i" * 10_000))
_bad("ids/lone-surrogate")(lambda ev: ev.document(event_id=ev.next_id() + "\udc80"))
_bad("ids/sql-too-long")(lambda ev: ev.document(deployment_id=SQL[0] * 20))
_bad("version/ItemOrdered-v3")(lambda ev: ev.document("ItemOrdered", schema_version=3))
_bad("version/Charged-v2")(lambda ev: ev.document("Charged", schema_version=2))
_bad("version/Reserved-v999999")(lambda ev: ev.document("Reserved", schema_version=999_999))
_bad("type/unknown")(lambda ev: ev.document("CouponRedeemed"))
_bad("type/module-path")(lambda ev: ev.document("os.system"))
_bad("type/sql")(lambda ev: ev.document(SQL[0]))
_bad("payload/ItemOrdered-missing-quantity")(
    lambda ev: ev.document("ItemOrdered", payload={"order_id": "o"})
)
_bad("payload/ItemOrdered-quantity-word")(
    lambda ev: ev.document("ItemOrdered", payload={"order_id": "o", "quantity": "many"})
)
_bad("payload/ItemOrdered-order-id-number")(
    lambda ev: ev.document("ItemOrdered", payload={"order_id": 7, "quantity": 1})
)
_bad("payload/ItemOrdered-v1-upcaster-fails")(
    lambda ev: ev.document("ItemOrdered", schema_version=1, payload={"order_id": "o"})
)
_bad("headers/forged-dlq-metadata")(
    lambda ev: ev.bad("headers/forged-dlq-metadata", {"not": "an envelope"}, _GARBAGE_HEADERS)
)


# ------------------------------------------------------------------ bad signals


class Signals:
    """Rollback signals of one test; the deployments named do not exist unless said."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._count = 0

    def next_id(self) -> str:
        """A new signal id."""
        self._count += 1
        return f"{self.tag}-s-{self._count}"

    def document(self, **fields: Any) -> dict[str, Any]:
        """A valid signal for a deployment nobody ever tracked, then `fields` applied."""
        document: dict[str, Any] = {
            "signal_id": self.next_id(),
            "deployment_id": f"never-tracked-{self.tag}",
            "issued_at": datetime.now(UTC).isoformat(),
            "reason": "reliability fuzz",
        }
        document.update(fields)
        return document

    def record(self, kind: str, value: Any, *, good: bool = False) -> Nasty:
        """A signal record; its expected rollback id follows the worker's rule."""
        raw = value if isinstance(value, bytes) or value is None else dumps(value)
        claimed = value.get("signal_id") if isinstance(value, dict) else None
        if not (isinstance(claimed, str) and 0 < len(claimed) <= 255):
            claimed = None
        return Nasty(kind, raw, key=f"{self.tag}-key".encode(), good=good, signal_id=claimed)


SignalMaker = Callable[[Signals], Any]
BAD_SIGNALS: dict[str, SignalMaker] = {
    "sig/not-json": lambda s: b"roll it back!",
    "sig/not-utf8": lambda s: b"\xff" + dumps(s.document()),
    "sig/null-value": lambda s: None,
    "sig/zero-bytes": lambda s: b"",
    "sig/array": lambda s: [s.document()],
    "sig/empty-object": lambda s: {},
    "sig/missing-signal-id": lambda s: {k: v for k, v in s.document().items() if k != "signal_id"},
    "sig/missing-issued-at": lambda s: {k: v for k, v in s.document().items() if k != "issued_at"},
    "sig/names-no-deployment": lambda s: s.document(deployment_id=None),
    "sig/service-without-version": lambda s: s.document(deployment_id=None, service="orders"),
    "sig/since-after-until": lambda s: s.document(
        since="2024-02-01T00:00:00Z", until="2024-01-01T00:00:00Z"
    ),
    "sig/cascade-word": lambda s: s.document(cascade="yes please"),
    "sig/force-number": lambda s: s.document(force=2),
    "sig/signal-id-256": lambda s: s.document(signal_id="s" * 256),
    "sig/signal-id-number": lambda s: s.document(signal_id=12345),
    "sig/signal-id-nul": lambda s: s.document(signal_id=s.next_id() + "\x00"),
    "sig/deployment-nul": lambda s: s.document(deployment_id="orders\x00"),
    "sig/issued-before-year-1": lambda s: s.document(issued_at="0001-01-01T00:00:00+05:00"),
    "sig/issued-naive": lambda s: s.document(issued_at="2024-01-01T00:00:00"),
    "sig/deep": lambda s: dumps(s.document())[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "sig/huge-int": lambda s: dumps(s.document())[:-1] + b', "n": ' + b"7" * 5000 + b"}",
    "sig/nan-field": lambda s: s.document(dry_run=float("nan")),
    "sig/1.5MB": lambda s: s.document(reason="r" * 1_500_000),
    "sig/5MB": lambda s: s.document(reason="r" * 5_000_000),
    "sig/unknown-deployment": lambda s: s.document(),
    "sig/sql-deployment": lambda s: s.document(deployment_id=SQL[1]),
    "sig/module-in-reason": lambda s: s.document(reason="os", sagas="os", module="os.system"),
    "sig/far-future-window": lambda s: s.document(until="9999-12-31T23:59:59Z", cascade=False),
    "sig/unknown-service-version": lambda s: s.document(
        deployment_id=None, service="orders", service_version="0.0.0-never"
    ),
}
HEAVY.update({"sig/1.5MB", "sig/5MB"})
# Records too large for the worker to send again: the DLQ keeps only their metadata.
TOO_LARGE_FOR_DLQ = {"size/5MB", "sig/5MB"}


# ------------------------------------------------------------------- hypothesis

ids = st.text(_NO_NUL, min_size=1, max_size=200)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_NO_NUL, max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(_NO_NUL, max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
rfc3339 = st.builds(
    lambda moment, minutes, zulu: (
        moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
        if zulu
        else moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat()
    ),
    st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31)),
    st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
    st.booleans(),
)


@st.composite
def good_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Valid envelopes of the dict-payload types: random ids, times, payloads, extras.

    `event_id` is random text; the storm appends a counter to keep ids unique.
    """
    document: dict[str, Any] = {
        "event_id": draw(ids),
        "event_type": draw(st.sampled_from(DICT_TYPES)),
        "schema_version": 1,
        "service": draw(ids),
        "service_version": draw(ids),
        "deployment_id": draw(ids),
        "occurred_at": draw(rfc3339),
        "payload": draw(st.dictionaries(st.text(_NO_NUL, max_size=8), json_values, max_size=5)),
    }
    for name in ENVELOPE_OPTIONAL:
        choice = draw(st.sampled_from(["absent", "null", "set"]))
        if choice != "absent":
            document[name] = draw(ids) if choice == "set" else None
    extras = draw(
        st.dictionaries(st.text(_NO_NUL, min_size=1, max_size=8), json_values, max_size=2)
    )
    known = {*REQUIRED, *ENVELOPE_OPTIONAL}
    return {**{k: v for k, v in extras.items() if k not in known}, **document}


@st.composite
def bad_envelopes(draw: st.DrawFn) -> Any:
    """A valid envelope broken in one way that the contract forbids."""
    document = draw(good_envelopes())
    how = draw(st.sampled_from(["missing", "invalid", "version", "unknown-type", "wrapped"]))
    if how == "missing":
        del document[draw(st.sampled_from(REQUIRED))]
    elif how == "invalid":
        name = draw(st.sampled_from(sorted(INVALID)))
        document[name] = draw(st.sampled_from(INVALID[name]))
    elif how == "version":
        document["schema_version"] = draw(st.integers(min_value=2, max_value=1_000_000))
        document["event_type"] = draw(st.sampled_from(["Charged", "Reserved"]))
    elif how == "unknown-type":
        document["event_type"] = "Unknown" + draw(st.text(_NO_NUL, max_size=20))
    else:
        return draw(st.sampled_from([[document], {"envelope": document}, [document, document]]))
    return document


garbage: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=300),
    st.text(_NO_NUL, max_size=100).map(str.encode),
    json_values.map(dumps),
)
"""Bytes that are not an envelope: random bytes, random text, random JSON."""

header_lists = st.lists(
    st.tuples(
        st.sampled_from(["traceparent", "tracestate", "x", ""]) | st.text(max_size=12),
        st.binary(max_size=64),
    ),
    max_size=4,
)


@st.composite
def bad_signal_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Signal-shaped objects that must end `rejected`: random fields, and any
    deployment they name was never tracked."""
    document: dict[str, Any] = {"signal_id": draw(ids | json_scalars)}
    for name, valid in (
        ("deployment_id", st.just("never-tracked")),
        ("service", ids),
        ("service_version", st.just("never-tracked")),
        ("since", rfc3339),
        ("until", rfc3339),
        ("issued_at", rfc3339),
        ("cascade", st.booleans()),
        ("dry_run", st.booleans()),
        ("force", st.booleans()),
        ("reason", st.text(_NO_NUL, max_size=50)),
    ):
        if draw(st.booleans()):
            document[name] = draw(valid | json_values)
    for name in ("deployment_id", "service_version"):
        # Whatever they name must never have been tracked.
        if isinstance(document.get(name), str):
            document[name] = "never-tracked-" + document[name]
    return document


def harvest(strategy: st.SearchStrategy[_T], count: int, seed: int) -> list[_T]:
    """Up to `count` examples of `strategy`, drawn by hypothesis's engine from `seed`.

    Hypothesis explores (boundary values, odd unicode, empty containers)
    better than a plain random generator; this runs it without shrinking, to
    feed records to a real broker.
    """
    found: list[_T] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: _T) -> None:
        found.append(example)

    collect()
    return found


# ------------------------------------------------------------------------ storm


@dataclass
class Pools:
    """Hypothesis-harvested material for a storm."""

    good: list[dict[str, Any]]
    bad: list[Any]
    garbage: list[bytes]
    headers: list[list[tuple[str, bytes]]]
    signals: list[dict[str, Any]]

    @classmethod
    def harvest(cls, size: int, seed: int) -> Pools:
        """Harvest `size` examples of each strategy."""
        return cls(
            good=harvest(good_envelopes(), size, seed),
            bad=harvest(bad_envelopes(), size, seed + 1),
            garbage=harvest(garbage, size, seed + 2),
            headers=harvest(header_lists, size, seed + 3),
            signals=harvest(bad_signal_documents(), max(size // 4, 10), seed + 4),
        )


def storm(
    ev: Events,
    signals: Signals,
    pools: Pools,
    count: int,
    *,
    event_topics: list[str],
    signal_topic: str,
    good_signal: Callable[[], Nasty],
    heavy_cap: int = 2,
) -> list[tuple[str, Nasty]]:
    """`count` records (at least one of every hand-written kind), interleaved.

    About 45 % good events, 45 % bad events, 10 % signals (a fifth of them
    good: `good_signal()`). Each hand-written kind comes once before any
    comes again; hypothesis pools fill the rest.
    """
    rng = ev.rng
    made: list[tuple[str, Nasty]] = []
    uses: dict[str, int] = {}

    def from_makers(
        makers: dict[str, Any], order: list[str], build: Callable[[str], list[Nasty]]
    ) -> list[Nasty]:
        while True:
            if not order:
                order.extend(rng.sample(sorted(makers), len(makers)))
            kind = order.pop()
            if kind in HEAVY and uses.get(kind, 0) >= heavy_cap:
                continue
            uses[kind] = uses.get(kind, 0) + 1
            return build(kind)

    good_order: list[str] = []
    bad_order: list[str] = []
    signal_order: list[str] = []
    # Every hand-written kind at least once, then the mix.
    pending = len(GOOD_EVENTS) + len(BAD_EVENTS) + len(BAD_SIGNALS)
    while len(made) < count or pending > 0:
        roll = rng.random()
        if roll < 0.10:
            if rng.random() < 0.2:
                made.append((signal_topic, good_signal()))
            elif pools.signals and rng.random() < 0.3:
                document = dict(rng.choice(pools.signals))
                claimed = document.get("signal_id")
                if isinstance(claimed, str) and 0 < len(claimed) <= 200:
                    document["signal_id"] = f"{claimed}#{signals.next_id()}"  # unique
                made.append((signal_topic, signals.record("sig/hypothesis", document)))
            else:
                for record in from_makers(
                    BAD_SIGNALS,
                    signal_order,
                    lambda k: [signals.record(k, BAD_SIGNALS[k](signals))],
                ):
                    made.append((signal_topic, record))
            continue
        topic = rng.choice(event_topics)
        if roll < 0.55:
            if rng.random() < 0.5 or not pools.good:
                records = from_makers(GOOD_EVENTS, good_order, lambda k: GOOD_EVENTS[k](ev))
            else:
                document = dict(rng.choice(pools.good))
                document["event_id"] = f"{document['event_id'][:200]}#{ev.next_id()}"
                headers = rng.choice(pools.headers) if pools.headers else []
                records = [ev.good("hypothesis/good", document, headers)]
        else:
            pick = rng.random()
            if pick < 0.5 or not pools.bad:
                records = from_makers(BAD_EVENTS, bad_order, lambda k: BAD_EVENTS[k](ev))
            elif pick < 0.8:
                records = [ev.bad("hypothesis/bad-envelope", rng.choice(pools.bad))]
            else:
                records = [ev.bad("hypothesis/garbage", rng.choice(pools.garbage))]
        made.extend((topic, r) for r in records)
        pending = sum(1 for k in (*GOOD_EVENTS, *BAD_EVENTS, *BAD_SIGNALS) if k not in uses)
    return made


# --------------------------------------------------------------------- producing


async def produce(
    bootstrap: str, records: Iterable[tuple[str, Nasty]], *, copies: int = 1
) -> list[Sent]:
    """Send every record (each `copies` times in a row, like a retrying producer).

    Sends are pipelined (not one round trip each) and the returned list is in
    sending order, with where each copy landed.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    try:
        pending = []
        for topic, record in records:
            for _ in range(copies):
                future = await producer.send(
                    topic, record.value, key=record.key, headers=list(record.headers)
                )
                pending.append((topic, record, future))
        sent = []
        for topic, record, future in pending:
            metadata = await future
            sent.append(Sent(record, topic, metadata.partition, metadata.offset))
        return sent
    finally:
        await producer.stop()


def expected_reason(kind: str) -> str:
    """The phrase a hand-written kind's `backout-error` must contain."""
    family, _, rest = kind.partition("/")
    if kind in ("empty/zero-bytes", "empty/whitespace"):
        return "is not JSON"
    if family in ("missing", "invalid"):
        return f"{rest.split('/')[0]}:"
    if family == "sig":
        return "rejected signal: "
    return {
        "utf8": "is not UTF-8",
        "json": "is not JSON",
        "nul": "NUL characters",
        "empty": "empty record" if kind == "empty/null-value" else "Field required",
        "shape": "must be a JSON object",
        "depth": "nest",
        "size": "byte limit",
        "ids": "invalid EventEnvelope",
        "version": "cannot be compensated",
        "type": "cannot be compensated",
        "payload": "payload",
        "headers": "invalid EventEnvelope",
    }.get(family, "")


# Every reason the tracker gives starts with or contains one of these.
READABLE_REASONS = (
    "is not UTF-8",
    "is not JSON",
    "NUL characters",
    "empty record",
    "must be a JSON object",
    "nests",
    "byte limit",
    "invalid EventEnvelope",
    "cannot be compensated",
    "payload",
)


# ------------------------------------------------------------------ the worker


@dataclass
class Target(WorkerTopics):
    """A `backout worker` process to throw records at, with names of its own."""

    bootstrap: str
    tag: str
    database_url: str
    worker: WorkerProcess

    @property
    def env(self) -> dict[str, str]:
        """The worker's settings (the CLI runs with the same ones)."""
        return self.worker.env

    @contextlib.asynccontextmanager
    async def ledger(self) -> AsyncIterator[Ledger]:
        """The worker's ledger, opened beside it (no migration: the worker did it)."""
        ledger = await Ledger.open(self.database_url, migrate_schema=False)
        try:
            yield ledger
        finally:
            await ledger.close()


async def start_target(bootstrap: str, database_url: str, log_dir: Any, **extra: str) -> Target:
    """Create the topics, then start a worker tracking `<tag>.{orders,payments,stock}.events`."""
    tag = unique_name("rel")
    await ensure_topics(bootstrap, service_topics(tag))
    env = worker_env(bootstrap, tag, database_url, extra)
    worker = WorkerProcess(env, log_path=log_dir / f"{tag}.log")
    await worker.start()
    return Target(bootstrap, tag, database_url, worker)


@pytest.fixture
async def targets(
    kafka_bootstrap: str, tmp_path: Any
) -> AsyncIterator[Callable[..., Awaitable[Target]]]:
    """Factory of started workers: `await targets(ledger_url, **env)`; each must stop cleanly."""
    started: list[Target] = []

    async def make(database_url: str, **extra: str) -> Target:
        target = await start_target(kafka_bootstrap, database_url, tmp_path, **extra)
        started.append(target)
        return target

    yield make
    for target in started:
        alive = target.worker.running
        code = await target.worker.stop()
        if alive:
            assert code == 0, f"worker exited with {code} on SIGTERM\n{target.worker.log_tail()}"


class HealthWatch:
    """Polls `GET /health` in the background; a worker that dies or degrades is noted."""

    def __init__(self, worker: WorkerProcess, interval: float = 0.25) -> None:
        self.worker = worker
        self.interval = interval
        self.polls = 0
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            self.polls += 1
            if not self.worker.running:
                self.failures.append(f"worker process exited ({self.worker.process})")
                return
            try:
                status, body = await self.worker.fetch("/health")
            except OSError as exc:
                self.failures.append(f"/health unreachable: {exc!r}")
            else:
                if status != 200:
                    self.failures.append(f"/health {status}: {body!r}")
            await asyncio.sleep(self.interval)

    def check(self) -> None:
        """Fail unless the worker stayed alive and healthy on every poll."""
        assert self.polls > 0
        assert not self.failures, (
            f"{len(self.failures)} of {self.polls} health polls failed: {self.failures[:5]}\n"
            + self.worker.log_tail()
        )


async def read_until(
    bootstrap: str,
    topic: str,
    done: Callable[[list[Record]], bool],
    *,
    timeout: float,
    what: Callable[[list[Record]], str],
) -> list[Record]:
    """Read `topic` from the start until `done(records so far)`; returns them all.

    Raises:
        AssertionError: the deadline passed; `what(records)` says what was missing.
    """
    seen: list[Record] = []

    def collect(record: Record) -> bool:
        seen.append(record)
        return done(seen)

    if done(seen):
        return seen
    try:
        await read_topic(bootstrap, topic, collect, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"{topic}: {what(seen)} after {timeout:g}s") from None
    return seen


async def wait_tracked(target: Target, event_ids: Iterable[str], timeout: float) -> float:
    """Wait until the ledger holds every one of `event_ids`; returns the seconds waited."""
    wanted = set(event_ids)
    started = time.monotonic()
    missing = wanted
    async with target.ledger() as ledger:
        while True:
            found = await ledger.events_by_id(missing)
            missing = missing - set(found)
            if not missing:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"{len(missing)} of {len(wanted)} good events not tracked within "
                    f"{timeout:g}s, e.g. {sorted(missing)[:5]}\n" + target.worker.log_tail()
                )
            await asyncio.sleep(0.2)
