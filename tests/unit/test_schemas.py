"""The wire contract (DESIGN §2) as the pydantic models in `schemas` implement it."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import (
    DeadLetter,
    EventEnvelope,
    RollbackSignal,
    RollbackState,
    RollbackStatus,
    canonical_json,
    describe_validation_error,
    export_json_schemas,
    format_time,
    sign,
    verify_signature,
)
from schemas.dlq import (
    ERROR_HEADER,
    MAX_REASON_LENGTH,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from tests.support.contract import ENVELOPE_OPTIONAL, ENVELOPE_REQUIRED

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
KEY = "s3cret-signal-key"

SIGNAL_REQUIRED = {"signal_id", "issued_at"}
STATUS_FIELDS = {
    "rollback_id",
    "deployment_id",
    "dry_run",
    "state",
    "planned",
    "applied",
    "confirmed",
    "failed",
    "skipped",
    "manual",
    "uncovered",
    "late",
    "error",
    "updated_at",
}


def envelope_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "event_id": "0b7e3c1e-0000-4000-8000-000000000001",
        "event_type": "OrderPlaced",
        "schema_version": 2,
        "service": "orders",
        "service_version": "2.4.0",
        "deployment_id": "orders-2.4.0-7f3a",
        "occurred_at": "2026-01-01T12:00:00Z",
        "payload": {"order_id": "o-1", "total": 12.5, "lines": [{"sku": "A", "qty": 2}]},
    }
    data.update(changes)
    return data


def signal_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "signal_id": "rb-1",
        "deployment_id": "orders-2.4.0-7f3a",
        "issued_at": "2026-01-01T13:00:00Z",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def error_fields(error: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in error.errors()}


# ------------------------------------------------------------------ envelope


class TestEnvelope:
    def test_required_fields_only_is_valid_and_optionals_default_to_none(self) -> None:
        envelope = EventEnvelope.model_validate(envelope_data())

        assert envelope.event_type == "OrderPlaced"
        assert envelope.schema_version == 2
        assert envelope.occurred_at == T0
        assert envelope.payload["lines"] == [{"sku": "A", "qty": 2}]
        assert envelope.correlation_id is None
        assert envelope.causation_id is None
        assert envelope.key is None

    @pytest.mark.parametrize("field", sorted(ENVELOPE_REQUIRED))
    def test_each_required_field_is_required(self, field: str) -> None:
        data = envelope_data()
        del data[field]

        with pytest.raises(ValidationError) as caught:
            EventEnvelope.model_validate(data)

        assert error_fields(caught.value) == {field}

    def test_optional_fields_are_kept(self) -> None:
        envelope = EventEnvelope.model_validate(
            envelope_data(correlation_id="checkout-9", causation_id="evt-0", key="o-1")
        )

        assert (envelope.correlation_id, envelope.causation_id, envelope.key) == (
            "checkout-9",
            "evt-0",
            "o-1",
        )

    def test_unknown_extra_fields_are_ignored(self) -> None:
        envelope = EventEnvelope.model_validate(
            envelope_data(added_in_v9="whatever", trace={"nested": True})
        )

        dumped = envelope.model_dump()
        assert "added_in_v9" not in dumped
        assert "trace" not in dumped
        assert not hasattr(envelope, "added_in_v9")

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("schema_version", 0),
            ("schema_version", "two"),
            ("event_id", ""),
            ("event_id", "x" * 256),
            ("service", ""),
            ("payload", ["not", "an", "object"]),
            ("payload", None),
            ("occurred_at", "yesterday"),
        ],
    )
    def test_bad_values_are_rejected(self, field: str, value: Any) -> None:
        with pytest.raises(ValidationError) as caught:
            EventEnvelope.model_validate(envelope_data(**{field: value}))

        assert field in {loc.split(".")[0] for loc in error_fields(caught.value)}

    @pytest.mark.parametrize(
        "naive", ["2026-01-01T12:00:00", datetime(2026, 1, 1, 12, 0)], ids=["text", "datetime"]
    )
    def test_naive_times_are_rejected(self, naive: Any) -> None:
        with pytest.raises(ValidationError) as caught:
            EventEnvelope.model_validate(envelope_data(occurred_at=naive))

        assert error_fields(caught.value) == {"occurred_at"}
        assert "offset" in str(caught.value)

    @pytest.mark.parametrize(
        "value",
        [
            "2026-01-01T14:00:00+02:00",
            "2026-01-01T07:00:00-05:00",
            datetime(2026, 1, 1, 21, 0, tzinfo=timezone(timedelta(hours=9))),
        ],
    )
    def test_offsets_are_normalised_to_utc(self, value: Any) -> None:
        envelope = EventEnvelope.model_validate(envelope_data(occurred_at=value))

        assert envelope.occurred_at == T0
        assert envelope.occurred_at.utcoffset() == timedelta(0)
        assert envelope.occurred_at.hour == 12

    def test_json_round_trip_renders_z(self) -> None:
        envelope = EventEnvelope.model_validate(
            envelope_data(occurred_at="2026-01-01T14:00:00.250000+02:00", key="o-1")
        )

        text = envelope.model_dump_json()
        decoded = json.loads(text)

        assert decoded["occurred_at"] == "2026-01-01T12:00:00.250000Z"
        assert EventEnvelope.model_validate_json(text) == envelope

    def test_format_time_renders_z_for_any_offset(self) -> None:
        plus_two = datetime(2026, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))

        assert format_time(plus_two) == "2026-01-01T12:00:00Z"

    @pytest.mark.parametrize(
        ("key", "correlation_id", "expected"),
        [
            ("o-1", "checkout-9", "o-1"),
            ("o-1", None, "o-1"),
            (None, "checkout-9", "checkout-9"),
            (None, None, None),
        ],
    )
    def test_record_key_is_key_else_correlation_id(
        self, key: str | None, correlation_id: str | None, expected: str | None
    ) -> None:
        envelope = EventEnvelope.model_validate(
            envelope_data(key=key, correlation_id=correlation_id)
        )

        assert envelope.record_key == expected


# -------------------------------------------------------------------- signal


class TestSignal:
    def test_named_by_deployment_id(self) -> None:
        signal = RollbackSignal.model_validate(signal_data())

        assert signal.deployment_id == "orders-2.4.0-7f3a"
        assert signal.record_key == "orders-2.4.0-7f3a"

    def test_named_by_service_and_version(self) -> None:
        signal = RollbackSignal.model_validate(
            signal_data(deployment_id=None, service="orders", service_version="2.4.0")
        )

        assert signal.deployment_id is None
        assert (signal.service, signal.service_version) == ("orders", "2.4.0")
        assert signal.record_key == "orders"

    @pytest.mark.parametrize(
        "naming",
        [
            {},
            {"service": "orders"},
            {"service_version": "2.4.0"},
            {"deployment_id": ""},
        ],
        ids=["nothing", "service-alone", "version-alone", "empty-deployment"],
    )
    def test_deployment_must_be_named_completely(self, naming: dict[str, str]) -> None:
        with pytest.raises(ValidationError):
            RollbackSignal.model_validate(signal_data(**{"deployment_id": None, **naming}))

    def test_service_alone_is_rejected_with_a_reason(self) -> None:
        with pytest.raises(ValidationError) as caught:
            RollbackSignal.model_validate(signal_data(deployment_id=None, service="orders"))

        assert "service_version" in str(caught.value)

    def test_since_after_until_is_rejected(self) -> None:
        with pytest.raises(ValidationError) as caught:
            RollbackSignal.model_validate(
                signal_data(since="2026-01-01T12:00:00Z", until="2026-01-01T11:59:59Z")
            )

        assert "since" in str(caught.value)

    def test_since_equal_to_until_is_a_valid_window(self) -> None:
        signal = RollbackSignal.model_validate(
            # The same instant written with two offsets.
            signal_data(since="2026-01-01T12:00:00Z", until="2026-01-01T14:00:00+02:00")
        )

        assert signal.since == signal.until == T0

    def test_offsets_compared_as_instants_in_window_check(self) -> None:
        # 13:00+02:00 is 11:00Z: earlier than until, although "13" > "12".
        signal = RollbackSignal.model_validate(
            signal_data(since="2026-01-01T13:00:00+02:00", until="2026-01-01T12:00:00Z")
        )

        assert signal.since == T0 - timedelta(hours=1)

    def test_defaults(self) -> None:
        signal = RollbackSignal.model_validate(signal_data())

        assert signal.cascade is True
        assert signal.dry_run is False
        assert signal.force is False
        assert signal.since is None
        assert signal.until is None
        assert signal.reason is None
        assert signal.requested_by is None

    def test_issued_at_is_required_and_must_be_aware(self) -> None:
        data = signal_data()
        del data["issued_at"]
        with pytest.raises(ValidationError) as missing:
            RollbackSignal.model_validate(data)
        with pytest.raises(ValidationError) as naive:
            RollbackSignal.model_validate(signal_data(issued_at="2026-01-01T13:00:00"))

        assert error_fields(missing.value) == {"issued_at"}
        assert error_fields(naive.value) == {"issued_at"}

    def test_canonical_bytes_are_sorted_compact_and_skip_nones(self) -> None:
        signal = RollbackSignal.model_validate(
            signal_data(reason="Fehlerquote ↑", since="2026-01-01T14:00:00+02:00")
        )

        raw = signal.canonical_bytes()

        assert raw == (
            b'{"cascade":true,"deployment_id":"orders-2.4.0-7f3a","dry_run":false,'
            b'"force":false,"issued_at":"2026-01-01T13:00:00Z",'
            b'"reason":"Fehlerquote \xe2\x86\x91","signal_id":"rb-1",'
            b'"since":"2026-01-01T12:00:00Z"}'
        )
        assert RollbackSignal.model_validate_json(raw) == signal

    def test_canonical_bytes_do_not_depend_on_input_order_or_formatting(self) -> None:
        data = signal_data(reason="r", requested_by="alertmanager", force=True)
        reordered = dict(reversed(list(data.items())))
        reordered["issued_at"] = "2026-01-01T14:00:00+01:00"  # the same instant

        first = RollbackSignal.model_validate(data).canonical_bytes()
        second = RollbackSignal.model_validate(reordered).canonical_bytes()
        via_json = RollbackSignal.model_validate_json(json.dumps(data, indent=4)).canonical_bytes()

        assert first == second == via_json

    def test_canonical_json_sorts_nested_keys_compactly(self) -> None:
        raw = canonical_json({"b": 1, "a": {"z": [1, 2], "y": None}, "é": "ü"})

        assert raw == '{"a":{"y":null,"z":[1,2]},"b":1,"é":"ü"}'.encode()


class TestSignature:
    def raw(self) -> bytes:
        return RollbackSignal.model_validate(signal_data()).canonical_bytes()

    def test_sign_is_hmac_sha256_of_the_bytes(self) -> None:
        raw = self.raw()

        header = sign(raw, KEY)

        expected = hmac.new(KEY.encode(), raw, hashlib.sha256).hexdigest()
        assert header == f"sha256={expected}"
        assert len(expected) == 64

    @pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
    def test_valid_signature_is_accepted(self, as_bytes: bool) -> None:
        raw = self.raw()
        header = sign(raw, KEY)

        assert verify_signature(raw, header.encode() if as_bytes else header, KEY) is None

    def test_missing_header_is_rejected(self) -> None:
        reason = verify_signature(self.raw(), None, KEY)

        assert reason is not None
        assert "missing" in reason
        assert "backout-signature" in reason

    def test_wrong_key_is_rejected(self) -> None:
        raw = self.raw()

        reason = verify_signature(raw, sign(raw, "another-key"), KEY)

        assert reason is not None
        assert "does not match" in reason

    def test_altered_bytes_are_rejected(self) -> None:
        raw = self.raw()
        header = sign(raw, KEY)
        altered = raw.replace(b'"cascade":true', b'"cascade":false')
        # Same meaning, different bytes: the signature covers bytes exactly as sent.
        reformatted = json.dumps(json.loads(raw), indent=1).encode()

        assert altered != raw
        assert verify_signature(altered, header, KEY) is not None
        assert verify_signature(reformatted, header, KEY) is not None

    @pytest.mark.parametrize(
        "header",
        ["", "deadbeef", "md5=abc", "SHA256=00", b"\xff\xfe", "sha256=", "sha256=zz"],
    )
    def test_malformed_header_is_rejected_not_raised(self, header: str | bytes) -> None:
        reason = verify_signature(self.raw(), header, KEY)

        assert reason is not None
        assert "backout-signature" in reason


# -------------------------------------------------------------------- status


class TestStatus:
    def test_fields_are_exactly_those_of_the_contract(self) -> None:
        assert set(RollbackStatus.model_fields) == STATUS_FIELDS

    def test_states_are_exactly_those_of_the_contract(self) -> None:
        assert {s.value for s in RollbackState} == {
            "accepted",
            "planning",
            "planned",
            "running",
            "paused",
            "completed",
            "completed_with_warnings",
            "failed",
            "rejected",
        }

    def test_terminal_states(self) -> None:
        terminal = {s for s in RollbackState if s.is_terminal}

        assert terminal == {
            RollbackState.PLANNED,
            RollbackState.COMPLETED,
            RollbackState.COMPLETED_WITH_WARNINGS,
            RollbackState.FAILED,
            RollbackState.REJECTED,
        }

    def test_json_has_every_field_counts_default_zero_and_z_times(self) -> None:
        status = RollbackStatus(
            rollback_id="rb-1",
            deployment_id="orders-2.4.0-7f3a",
            state=RollbackState.RUNNING,
            planned=4,
            applied=1,
            updated_at=datetime(2026, 1, 1, 13, 0, tzinfo=timezone(timedelta(hours=1))),
        )

        decoded = json.loads(status.model_dump_json())

        assert set(decoded) == STATUS_FIELDS
        assert decoded["state"] == "running"
        assert decoded["updated_at"] == "2026-01-01T12:00:00Z"
        assert decoded["dry_run"] is False
        assert decoded["error"] is None
        assert (decoded["planned"], decoded["applied"]) == (4, 1)
        for name in ("confirmed", "failed", "skipped", "manual", "uncovered", "late"):
            assert decoded[name] == 0
        assert RollbackStatus.model_validate_json(status.model_dump_json()) == status

    def test_unknown_state_and_negative_counts_are_rejected(self) -> None:
        with pytest.raises(ValidationError):
            RollbackStatus(rollback_id="rb", state="exploded", updated_at=T0)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            RollbackStatus(rollback_id="rb", state=RollbackState.RUNNING, failed=-1, updated_at=T0)


# --------------------------------------------------------------- dead letter


class TestDeadLetter:
    def test_headers_round_trip(self) -> None:
        letter = DeadLetter(
            error="invalid EventEnvelope: occurred_at: Field required",
            source_topic="orders.events",
            source_partition=3,
            source_offset=1_234_567_890_123,
        )

        headers = letter.headers()

        assert headers == [
            (ERROR_HEADER, b"invalid EventEnvelope: occurred_at: Field required"),
            (SOURCE_TOPIC_HEADER, b"orders.events"),
            (SOURCE_PARTITION_HEADER, b"3"),
            (SOURCE_OFFSET_HEADER, b"1234567890123"),
        ]
        # The DLQ record also carries the original record's own headers.
        original = [("traceparent", b"00-abc-def-01"), ("backout-signature", b"sha256=00")]
        assert DeadLetter.from_headers(original + headers) == letter

    def test_header_names_match_the_contract(self) -> None:
        letter = DeadLetter(error="x", source_topic="t", source_partition=0, source_offset=0)

        assert [name for name, _ in letter.headers()] == [
            "backout-error",
            "backout-source-topic",
            "backout-source-partition",
            "backout-source-offset",
        ]

    def test_long_reasons_are_truncated(self) -> None:
        letter = DeadLetter(
            error="é" * (MAX_REASON_LENGTH * 3),
            source_topic="t",
            source_partition=0,
            source_offset=1,
        )

        reason = dict(letter.headers())[ERROR_HEADER].decode()

        assert len(reason) == MAX_REASON_LENGTH
        assert reason.endswith("…")
        assert reason.startswith("é" * 10)

    def test_reason_at_the_limit_is_kept_whole(self) -> None:
        text = "x" * MAX_REASON_LENGTH
        letter = DeadLetter(error=text, source_topic="t", source_partition=0, source_offset=1)

        assert dict(letter.headers())[ERROR_HEADER] == text.encode()

    def test_empty_reason_is_rejected(self) -> None:
        with pytest.raises(ValidationError):
            DeadLetter(error="", source_topic="t", source_partition=0, source_offset=1)


# ------------------------------------------------------- errors and export


class TestDescribeValidationError:
    def test_one_readable_line_naming_the_fields(self) -> None:
        data = envelope_data(schema_version="two")
        del data["occurred_at"]
        with pytest.raises(ValidationError) as caught:
            EventEnvelope.model_validate(data)

        text = describe_validation_error("EventEnvelope", caught.value)

        assert text.startswith("invalid EventEnvelope: ")
        assert "\n" not in text
        assert "occurred_at: Field required" in text
        assert "schema_version: " in text
        assert "and " not in text

    def test_many_errors_are_summarised(self) -> None:
        with pytest.raises(ValidationError) as caught:
            EventEnvelope.model_validate({})

        text = describe_validation_error("EventEnvelope", caught.value, limit=5)

        assert "\n" not in text
        assert text.count(": Field required") == 5
        assert text.endswith(f"and {len(ENVELOPE_REQUIRED) - 5} more")

    def test_record_level_errors_are_labelled(self) -> None:
        with pytest.raises(ValidationError) as caught:
            RollbackSignal.model_validate(signal_data(deployment_id=None))

        text = describe_validation_error("RollbackSignal", caught.value)

        assert text.startswith("invalid RollbackSignal: (record): ")
        assert "deployment_id" in text

    def test_nested_locations_are_dotted(self) -> None:
        with pytest.raises(ValidationError) as caught:
            EventEnvelope.model_validate(envelope_data(payload={"a": 1}, schema_version=None))

        text = describe_validation_error("EventEnvelope", caught.value)

        assert "schema_version: " in text


JSON_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}


def check_schema_node(node: Any, root: dict[str, Any], path: str) -> None:
    """A small structural check of a JSON Schema (no validator library is installed)."""
    assert isinstance(node, dict | bool), path
    if isinstance(node, bool):
        return
    if "type" in node:
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        assert set(types) <= JSON_TYPES, path
    if "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/$defs/"), path
        assert ref.removeprefix("#/$defs/") in root.get("$defs", {}), path
    if "required" in node:
        assert isinstance(node["required"], list), path
        assert set(node["required"]) <= set(node.get("properties", {})), path
    for name, child in node.get("properties", {}).items():
        check_schema_node(child, root, f"{path}.{name}")
    for keyword in ("anyOf", "oneOf", "allOf"):
        for index, child in enumerate(node.get(keyword, [])):
            check_schema_node(child, root, f"{path}.{keyword}[{index}]")
    for name, child in node.get("$defs", {}).items():
        check_schema_node(child, root, f"{path}.$defs.{name}")
    for keyword in ("items", "additionalProperties"):
        if keyword in node:
            check_schema_node(node[keyword], root, f"{path}.{keyword}")


class TestExportJsonSchemas:
    def test_writes_three_valid_schemas_with_the_contract_fields(self, tmp_path: Path) -> None:
        out = tmp_path / "schemas" / "nested"

        written = export_json_schemas(out)

        assert [p.name for p in written] == [
            "event-envelope.schema.json",
            "rollback-signal.schema.json",
            "rollback-status.schema.json",
        ]
        assert sorted(out.iterdir()) == sorted(written)
        loaded = {p.name.removesuffix(".schema.json"): json.loads(p.read_text()) for p in written}
        for name, schema in loaded.items():
            assert schema["type"] == "object", name
            check_schema_node(schema, schema, name)

        envelope, signal, status = (
            loaded["event-envelope"],
            loaded["rollback-signal"],
            loaded["rollback-status"],
        )
        assert set(envelope["required"]) == set(ENVELOPE_REQUIRED)
        assert set(envelope["properties"]) == {*ENVELOPE_REQUIRED, *ENVELOPE_OPTIONAL}
        assert envelope["properties"]["occurred_at"]["format"] == "date-time"
        assert envelope["properties"]["schema_version"]["minimum"] == 1
        assert set(signal["required"]) == SIGNAL_REQUIRED
        assert {
            "deployment_id",
            "service",
            "service_version",
            "since",
            "until",
            "cascade",
            "dry_run",
            "reason",
            "requested_by",
            "force",
        } <= set(signal["properties"])
        assert signal["properties"]["cascade"]["default"] is True
        assert set(status["properties"]) == STATUS_FIELDS
        assert {"rollback_id", "state", "updated_at"} <= set(status["required"])

    def test_export_is_stable(self, tmp_path: Path) -> None:
        first = [p.read_bytes() for p in export_json_schemas(tmp_path / "a")]
        second = [p.read_bytes() for p in export_json_schemas(tmp_path / "a")]

        assert first == second
        assert all(raw.endswith(b"\n") for raw in first)
