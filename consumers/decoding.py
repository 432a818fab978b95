"""Turning raw records from tracked topics into ledger events, or a readable reason why not."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pydantic import ValidationError

from sagas.errors import UpcastError
from sagas.ledger import TrackedEvent
from sagas.registry import Compensate, SagaRegistry, Uncovered
from sagas.tracing import traceparent_of
from schemas.envelope import EventEnvelope
from schemas.errors import describe_validation_error

MAX_RECORD_BYTES = 1024 * 1024
MAX_NESTING = 64


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that cannot be tracked, and why (goes to the DLQ)."""

    reason: str


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
        envelope = self._envelope(value)
        if isinstance(envelope, Rejected):
            return envelope
        problem = self._check_against_sagas(envelope)
        if problem is not None:
            return problem
        traceparent, tracestate = traceparent_of(headers)
        return TrackedEvent(
            event_id=envelope.event_id,
            event_type=envelope.event_type,
            schema_version=envelope.schema_version,
            service=envelope.service,
            service_version=envelope.service_version,
            deployment_id=envelope.deployment_id,
            occurred_at=envelope.occurred_at,
            payload=dict(envelope.payload),
            correlation_id=envelope.correlation_id,
            causation_id=envelope.causation_id,
            key=envelope.key,
            topic=topic,
            partition=partition,
            offset=offset,
            traceparent=traceparent if traceparent and len(traceparent) <= 64 else None,
            tracestate=tracestate,
        )

    def _envelope(self, value: bytes | None) -> EventEnvelope | Rejected:
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
            document = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
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
        if nesting_depth(document) > MAX_NESTING:
            return Rejected(f"record nests deeper than {MAX_NESTING} levels")
        # Checked on the parsed strings, not the text: `"\\u0000"` (an escaped
        # backslash, then `u0000`) is six harmless characters, not a NUL.
        if "\\u0000" in text and _contains_nul(document):
            return Rejected("record contains NUL characters, which the ledger cannot store")
        try:
            return EventEnvelope.model_validate(document)
        except ValidationError as exc:
            return Rejected(describe_validation_error("EventEnvelope", exc))

    def _check_against_sagas(self, envelope: EventEnvelope) -> Rejected | None:
        if envelope.event_type in self.confirmation_types:
            return None
        resolution = self.registry.resolve(envelope.event_type, envelope.schema_version)
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
            payload = self.registry.upcast(
                envelope.event_type, envelope.schema_version, step.version, dict(envelope.payload)
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
