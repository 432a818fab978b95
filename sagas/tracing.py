"""Span names, attribute names and W3C context helpers: tracing in one place.

Names follow the OpenTelemetry messaging semantic conventions for Kafka where
they apply; `backout.*` attributes are ours.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Link, SpanContext, Tracer

TRACER_NAME = "backout"

SPAN_ROLLBACK = "backout rollback"
SPAN_PLAN = "backout plan"
SPAN_COMPENSATE = "backout compensate"
SPAN_CONFIRM = "backout confirm"
SPAN_SIGNAL_PUBLISH = "backout signal"


def span_process(topic: str) -> str:
    """Name of a consumer span: `process {topic}`."""
    return f"process {topic}"


def span_send(topic: str) -> str:
    """Name of a producer span: `send {topic}`."""
    return f"send {topic}"


ROLLBACK_ID = "backout.rollback_id"
DEPLOYMENT_ID = "backout.deployment_id"
EVENT_ID = "backout.event_id"
EVENT_TYPE = "backout.event_type"
SAGA = "backout.saga"
STEP = "backout.step"
IDEMPOTENCY_KEY = "backout.idempotency_key"
ATTEMPT = "backout.attempt"
OUTCOME = "backout.outcome"
PLANNED = "backout.planned"
DRY_RUN = "backout.dry_run"
TRACKING_CAUGHT_UP = "backout.tracking_caught_up"

MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_PARTITION = "messaging.destination.partition.id"
MESSAGING_KEY = "messaging.kafka.message.key"
MESSAGING_OFFSET = "messaging.kafka.offset"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"


def tracer() -> Tracer:
    """Backout's tracer (a no-op until an SDK provider is installed)."""
    return trace.get_tracer(TRACER_NAME)


def installed() -> bool:
    """Whether a real tracer provider is installed (else every span is a no-op).

    OpenTelemetry's no-op tracer hands back the current span as the "new"
    one, so skipping a span when this is False changes nothing but the cost
    (hot paths: a compensation attempt and its command).
    """
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def context_from_headers(headers: Iterable[tuple[str, bytes]] | None) -> Context:
    """The trace context carried by Kafka record headers (W3C `traceparent`)."""
    carrier = {
        name.lower(): value.decode("latin-1")
        for name, value in headers or ()
        if name.lower() in ("traceparent", "tracestate") and value is not None
    }
    return extract(carrier)


def context_from_traceparent(traceparent: str | None, tracestate: str | None = None) -> Context:
    """A context from stored W3C values (an empty context when absent)."""
    carrier = {}
    if traceparent:
        carrier["traceparent"] = traceparent
        if tracestate:
            carrier["tracestate"] = tracestate
    return extract(carrier)


def link_to(traceparent: str | None, tracestate: str | None = None) -> list[Link]:
    """A link to the span a stored `traceparent` names, if it is valid."""
    span_context: SpanContext = trace.get_current_span(
        context_from_traceparent(traceparent, tracestate)
    ).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []


def current_headers(context: Context | None = None) -> list[tuple[str, bytes]]:
    """W3C headers for the current (or given) context, ready for a Kafka record."""
    carrier: dict[str, str] = {}
    inject(carrier, context=context)
    return [(name, value.encode()) for name, value in carrier.items()]


def traceparent_of(headers: Iterable[tuple[str, bytes]] | None) -> tuple[str | None, str | None]:
    """The raw (traceparent, tracestate) header values, for storing with an event.

    W3C trace context is printable ASCII; anything else (NUL bytes, binary
    garbage) is treated as absent: PostgreSQL refuses NUL in text, and one
    such header would otherwise fail its whole tracking batch, forever.
    """
    found: dict[str, str] = {}
    for name, value in headers or ():
        lowered = name.lower()
        if lowered in ("traceparent", "tracestate") and value is not None and lowered not in found:
            text = value.decode("latin-1")[:512]
            if text.isascii() and text.isprintable():
                found[lowered] = text
    return found.get("traceparent"), found.get("tracestate")


def traceparent_of_span(span: trace.Span) -> str | None:
    """The W3C `traceparent` naming `span`, or None for a non-recording span."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
