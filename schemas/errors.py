"""Readable validation errors for records that fail the wire contract."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(model_name: str, error: ValidationError, limit: int = 5) -> str:
    """Turn a pydantic error into one line an operator can act on.

    Example: ``invalid EventEnvelope: occurred_at: Field required; schema_version:
    Input should be a valid integer``.
    """
    parts = []
    for item in error.errors()[:limit]:
        location = ".".join(str(p) for p in item["loc"]) or "(record)"
        parts.append(f"{location}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return f"invalid {model_name}: " + "; ".join(parts)
