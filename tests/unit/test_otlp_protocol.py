"""`OTEL_EXPORTER_OTLP_*PROTOCOL`: HTTP/protobuf is used; anything else is refused loudly."""

from __future__ import annotations

import pytest

from consumers.observability import check_otlp_protocol

VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_unset_and_http_protobuf_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    check_otlp_protocol()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    check_otlp_protocol()


@pytest.mark.parametrize("variable", VARIABLES)
@pytest.mark.parametrize("protocol", ["grpc", "http/json"])
def test_other_protocols_are_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, variable: str, protocol: str
) -> None:
    monkeypatch.setenv(variable, protocol)
    with pytest.raises(ValueError, match=f"{variable}='{protocol}'") as refused:
        check_otlp_protocol()
    assert "http/protobuf" in str(refused.value)
    assert "4318" in str(refused.value)


def test_the_traces_variable_wins_over_the_general_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    check_otlp_protocol()
