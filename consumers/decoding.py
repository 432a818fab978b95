"""Turning raw records from tracked topics into ledger events, or a readable reason why not."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from sagas.errors import UpcastError
from sagas.ledger import TrackedEvent, tracked_from_envelope
from sagas.registry import Compensate, Resolution, SagaRegistry, Uncovered
from sagas.tracing import traceparent_of
from schemas.envelope import EventEnvelope
from schemas.errors import describe_validation_error

MAX_RECORD_BYTES = 1024 * 1024
MAX_NESTING = 64

# The fast path below takes only what `EventEnvelope` certainly accepts, with
# the same values; anything else goes through pydantic, which also words the
# error. Times: RFC 3339 with `T`, at most microseconds, `Z` or ±hh:mm.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})\Z"
)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that cannot be tracked, and why (goes to the DLQ)."""

    reason: str


def _fast_event(
    document: dict[str, Any],
    topic: str,
    partition: int,
    offset: int,
    traceparent: str | None,
    tracestate: str | None,
) -> TrackedEvent | None:
    """The event of a plainly well-formed envelope, or None: let pydantic decide.

    Validating with pydantic cost as much as inserting the row; this accepts
    only documents whose every field pydantic would take as it is. Ids must be
    ASCII: pydantic refuses strings holding lone surrogates (JSON allows
    "\ud800"), and `isascii` is O(1) in CPython; other text takes the slow path.
    (Written out, not looped: this runs for every tracked record.)
    """
    get = document.get
    event_id, event_type = get("event_id"), get("event_type")
    service, service_version = get("service"), get("service_version")
    deployment_id, version = get("deployment_id"), get("schema_version")
    correlation_id, causation_id, key = get("correlation_id"), get("causation_id"), get("key")
    payload, occurred = get("payload"), get("occurred_at")
    if not (
        type(event_id) is str
        and 0 < len(event_id) <= 255
        and event_id.isascii()
        and type(event_type) is str
        and 0 < len(event_type) <= 255
        and event_type.isascii()
        and type(service) is str
        and 0 < len(service) <= 255
        and service.isascii()
        and type(service_version) is str
        and 0 < len(service_version) <= 255
        and service_version.isascii()
        and type(deployment_id) is str
        and 0 < len(deployment_id) <= 255
        and deployment_id.isascii()
        and (
            correlation_id is None
            or (
                type(correlation_id) is str
                and 0 < len(correlation_id) <= 255
                and correlation_id.isascii()
            )
        )
        and (
            causation_id is None
            or (
                type(causation_id) is str
                and 0 < len(causation_id) <= 255
                and causation_id.isascii()
            )
        )
        and (key is None or (type(key) is str and 0 < len(key) <= 255 and key.isascii()))
        and type(version) is int
        and 1 <= version <= 1_000_000
        and type(payload) is dict
        and all(k.isascii() for k in payload)
        and type(occurred) is str
        and _RFC3339.match(occurred)
    ):
        return None
    try:
        occurred_at = datetime.fromisoformat(occurred).astimezone(UTC)
    except (ValueError, OverflowError):  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        return None
    return TrackedEvent(
        event_id=event_id,
        event_type=event_type,
        schema_version=version,
        service=service,
        service_version=service_version,
        deployment_id=deployment_id,
        occurred_at=occurred_at,
        payload=dict(payload),
        correlation_id=correlation_id,
        causation_id=causation_id,
        key=key,
        topic=topic,
        partition=partition,
        offset=offset,
        traceparent=traceparent,
        tracestate=tracestate,
    )


def _finite_float(text: str) -> float:
    # `1e999` parses to inf: not representable in JSON, and PostgreSQL's json
    # type refuses the `Infinity` it would be stored as (a poison batch).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the float range")
    return value


def _no_constant(name: str) -> float:
    # Python's json accepts NaN/Infinity; JSON (RFC 8259) and PostgreSQL do not.
    raise ValueError(f"{name} is not a JSON value")


# One decoder for every record (`json.loads` with these options builds a new
# one per call).
_JSON = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)

# orjson parses an envelope in about a third of the time (measured, a
# 460-byte envelope: 2.3 against 6.9 µs), but turns integers beyond 64 bits
# into floats. A run of 19 digits anywhere (found at C speed, ~0.7 µs) sends
# the record to the standard library, as does anything orjson refuses, so
# that every edge case and every error message stays what it was.
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_NUMBER = b"0" * 19


def _parse(value: bytes, text: str) -> Any:
    """`value` (whose UTF-8 `text` is given too) as JSON, as `_JSON` would parse it."""
    if _LONG_NUMBER not in value.translate(_DIGITS):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
    return _JSON.decode(text)


def _contains_nul(value: object) -> bool:
    """True when a string (or an object key) anywhere in a JSON value holds NUL."""
    stack: list[object] = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, str):
            if "\x00" in current:
                return True
        elif isinstance(current, dict):
            stack.extend(current.keys())
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return False


def nesting_depth(value: object) -> int:
    """How deeply JSON containers nest (iteratively: hostile input can be deep)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in current.values())
        elif isinstance(current, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in current)
    return deepest


class EventDecoder:
    """Validates envelopes against the contract and the loaded sagas.

    Args:
        registry: the loaded sagas; payloads of known (type, version) are
            validated against the saga's model (after upcasting).
        track_unknown: track event types no saga declares (they show up as
            `uncovered` in rollbacks) instead of dead-lettering them.
    """

    def __init__(self, registry: SagaRegistry, *, track_unknown: bool = False) -> None:
        self.registry = registry
        self.track_unknown = track_unknown
        self.confirmation_types = {
            step.confirm
            for saga in registry.sagas
            for step in saga.steps.values()
            if step.confirm is not None
        }
        # How each (type, version) resolves, while the number of loaded sagas
        # stays the same (resolving scans a saga's steps; every record asks).
        self._resolutions: dict[tuple[str, int], Resolution] = {}
        self._resolved_for = -1

    def decode(
        self,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        *,
        topic: str,
        partition: int,
        offset: int,
    ) -> TrackedEvent | Rejected:
        """One record → a `TrackedEvent`, or `Rejected` with the reason."""
        document = self._document(value)
        if isinstance(document, Rejected):
            return document
        traceparent, tracestate = traceparent_of(headers)
        if not traceparent or len(traceparent) > 64:
            traceparent = None
        event = _fast_event(document, topic, partition, offset, traceparent, tracestate)
        if event is None:
            try:
                envelope = EventEnvelope.model_validate(document)
            except ValidationError as exc:
                return Rejected(describe_validation_error("EventEnvelope", exc))
            event = tracked_from_envelope(
                envelope,
                topic=topic,
                partition=partition,
                offset=offset,
                traceparent=traceparent,
                tracestate=tracestate,
            )
        problem = self._check_against_sagas(event)
        return event if problem is None else problem

    def _document(self, value: bytes | None) -> dict[str, Any] | Rejected:
        """The record as a JSON object within the ledger's limits, or why not."""
        if value is None:
            return Rejected("empty record (null value): expected a JSON event envelope")
        if len(value) > MAX_RECORD_BYTES:
            return Rejected(
                f"record of {len(value)} bytes is over the {MAX_RECORD_BYTES}-byte limit"
            )
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejected(f"record value is not UTF-8: {exc}")
        if "\x00" in text:
            return Rejected("record contains NUL characters, which the ledger cannot store")
        try:
            document = _parse(value, text)
        except RecursionError:
            return Rejected("record value nests too deeply to parse")
        except ValueError as exc:
            # JSONDecodeError, NaN/Infinity, and integers over Python's
            # 4300-digit conversion limit (a plain ValueError).
            return Rejected(f"record value is not JSON: {exc}")
        if not isinstance(document, dict):
            return Rejected(
                f"record value must be a JSON object (an event envelope), "
                f"got {type(document).__name__}"
            )
        # Nesting cannot exceed the number of opening brackets: count them (at
        # C speed) and walk the document only when that does not settle it.
        brackets = value.count(b"{") + value.count(b"[")
        if brackets > MAX_NESTING and nesting_depth(document) > MAX_NESTING:
            return Rejected(f"record nests deeper than {MAX_NESTING} levels")
        # Checked on the parsed strings, not the text: `"\\u0000"` (an escaped
        # backslash, then `u0000`) is six harmless characters, not a NUL.
        if "\\u0000" in text and _contains_nul(document):
            return Rejected("record contains NUL characters, which the ledger cannot store")
        return document

    def _resolve(self, event_type: str, version: int) -> Resolution:
        loaded = len(self.registry.sagas)
        if loaded != self._resolved_for:
            self._resolutions.clear()
            self._resolved_for = loaded
        key = (event_type, version)
        resolution = self._resolutions.get(key)
        if resolution is None:
            resolution = self._resolutions[key] = self.registry.resolve(event_type, version)
        return resolution

    def _check_against_sagas(self, envelope: TrackedEvent) -> Rejected | None:
        if envelope.event_type in self.confirmation_types:
            return None
        resolution = self._resolve(envelope.event_type, envelope.schema_version)
        if isinstance(resolution, Uncovered):
            if self.track_unknown:
                return None
            return Rejected(
                f"{envelope.event_type} v{envelope.schema_version} cannot be compensated: "
                f"{resolution.reason} (load a saga that handles it and replay the DLQ, or set "
                "BACKOUT_UNKNOWN_EVENTS=track)"
            )
        if not isinstance(resolution, Compensate) or resolution.step.model is None:
            return None
        step = resolution.step
        try:
            payload = envelope.payload
            if envelope.schema_version != step.version:
                payload = self.registry.upcast(
                    envelope.event_type, envelope.schema_version, step.version, dict(payload)
                )
            assert step.model is not None
            step.model.model_validate(payload)
        except UpcastError as exc:
            return Rejected(f"payload of {envelope.event_type} v{envelope.schema_version}: {exc}")
        except ValidationError as exc:
            return Rejected(
                describe_validation_error(
                    f"{envelope.event_type} v{envelope.schema_version} payload", exc
                )
            )
        return None
