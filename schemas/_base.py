"""Shared pieces of the wire models: the base config and the UTC time type."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainSerializer


def _require_utc(value: datetime) -> datetime:
    # RFC 3339 demands an offset; a naive time is ambiguous across services, so
    # it is rejected rather than guessed. Any offset is accepted and normalised.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("time must carry a UTC offset (RFC 3339), e.g. 2026-01-31T12:00:00Z")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+01:00 is a valid RFC 3339 time with no UTC datetime;
        # pydantic only turns ValueError into a validation error.
        raise ValueError("time is out of range once converted to UTC (years 1-9999)") from None


def format_time(value: datetime) -> str:
    """Render a time as RFC 3339 UTC with a `Z` suffix."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcTime = Annotated[
    datetime,
    AfterValidator(_require_utc),
    PlainSerializer(format_time, return_type=str, when_used="json"),
]
"""A timezone-aware time, normalised to UTC, serialised as RFC 3339 with `Z`."""


class WireModel(BaseModel):
    """Base of every wire model: unknown fields ignored, values immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)


def utc_now() -> datetime:
    """The current time in UTC (the one place wall-clock time is read for the wire)."""
    return datetime.now(UTC)
