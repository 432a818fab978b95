"""The event envelope services emit on their event topics (DESIGN §2.1)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from schemas._base import UtcTime, WireModel

# Ids are bounded so a hostile or broken producer cannot bloat the ledger's
# indexes; 255 fits every id scheme in practice (UUIDs, ULIDs, k8s names).
_ID = Field(min_length=1, max_length=255)


class EventEnvelope(WireModel):
    """One domain event, stamped with the deployment that emitted it."""

    event_id: str = _ID
    event_type: str = Field(min_length=1, max_length=255)
    schema_version: int = Field(ge=1, le=1_000_000)
    service: str = Field(min_length=1, max_length=255)
    service_version: str = Field(min_length=1, max_length=255)
    deployment_id: str = Field(min_length=1, max_length=255)
    occurred_at: UtcTime
    correlation_id: str | None = Field(default=None, min_length=1, max_length=255)
    causation_id: str | None = Field(default=None, min_length=1, max_length=255)
    key: str | None = Field(default=None, min_length=1, max_length=255)
    payload: dict[str, Any]

    @property
    def record_key(self) -> str | None:
        """The Kafka record key the contract prescribes: `key`, else `correlation_id`."""
        return self.key if self.key is not None else self.correlation_id
