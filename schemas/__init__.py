"""The wire contract of Backout as pydantic models (DESIGN §2)."""

from schemas._base import UtcTime, format_time, utc_now
from schemas.dlq import DeadLetter
from schemas.envelope import EventEnvelope
from schemas.errors import describe_validation_error
from schemas.export import export_json_schemas, json_schemas
from schemas.signal import RollbackSignal, canonical_json, sign, verify_signature
from schemas.status import RollbackState, RollbackStatus

__all__ = [
    "DeadLetter",
    "EventEnvelope",
    "RollbackSignal",
    "RollbackState",
    "RollbackStatus",
    "UtcTime",
    "canonical_json",
    "describe_validation_error",
    "export_json_schemas",
    "format_time",
    "json_schemas",
    "sign",
    "utc_now",
    "verify_signature",
]
