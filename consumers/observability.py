"""OpenTelemetry SDK setup by environment (`OTEL_*`, `BACKOUT_TRACE_FILE`)."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from consumers.settings import Settings
from sagas.errors import BackoutError


class TracingSettingsError(BackoutError, ValueError):
    """`OTEL_*` settings Backout cannot honour (the CLI prints the message, exit 1)."""


class JsonLinesExporter(SpanExporter):
    """One JSON span per line (the `console` exporter), to stderr or a file."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def export(self, spans: "list[ReadableSpan] | tuple[ReadableSpan, ...]") -> SpanExportResult:  # noqa: UP037
        for span in spans:
            self.stream.write(span.to_json(indent=None) + "\n")
        self.stream.flush()
        return SpanExportResult.SUCCESS


def exporter_name() -> str:
    """`OTEL_TRACES_EXPORTER`, defaulting to otlp when an endpoint is set, else none."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name:
        return name
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    return "otlp" if endpoint else "none"


# The one OTLP transport installed (grpcio is a heavy native dependency).
OTLP_PROTOCOL = "http/protobuf"


def check_otlp_protocol() -> None:
    """Refuse an OTLP protocol other than HTTP/protobuf instead of ignoring it.

    A collector told to listen for gRPC (port 4317) would otherwise receive
    HTTP requests and drop every span, with nothing in the worker's log.
    """
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(variable, "").strip().lower()
        if protocol and protocol != OTLP_PROTOCOL:
            raise TracingSettingsError(
                f"{variable}={protocol!r}: Backout exports OTLP over {OTLP_PROTOCOL} only; "
                f"set {variable}={OTLP_PROTOCOL} and point OTEL_EXPORTER_OTLP_ENDPOINT at "
                "the collector's HTTP port (4318)"
            )
        if protocol:
            return  # the traces-specific variable wins over the general one


def configure_tracing(settings: Settings) -> TracerProvider | None:
    """Install a tracer provider as the environment asks; None for `none`."""
    name = exporter_name()
    if name == "none":
        return None
    service = os.environ.get("OTEL_SERVICE_NAME", "backout")
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    if name == "console":
        stream: TextIO = (
            open(settings.trace_file, "a", encoding="utf-8")  # noqa: SIM115  # lives with the process
            if settings.trace_file
            else sys.stderr
        )
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(stream)))
    elif name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        check_otlp_protocol()

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise TracingSettingsError(f"OTEL_TRACES_EXPORTER={name!r} is not otlp, console or none")
    trace.set_tracer_provider(provider)
    return provider
