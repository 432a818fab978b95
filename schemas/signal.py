"""The rollback signal published on `backout.rollbacks` (DESIGN §2.2)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from pydantic import Field, model_validator

from schemas._base import UtcTime, WireModel

SIGNATURE_HEADER = "backout-signature"
SIGNATURE_PREFIX = "sha256="


class RollbackSignal(WireModel):
    """A request to undo what one deployment wrote.

    The deployment is named either by `deployment_id` or by `service` plus
    `service_version`. `signal_id` is both the idempotency key of the signal
    and the id of the rollback it starts.
    """

    signal_id: str = Field(min_length=1, max_length=255)
    deployment_id: str | None = Field(default=None, min_length=1, max_length=255)
    service: str | None = Field(default=None, min_length=1, max_length=255)
    service_version: str | None = Field(default=None, min_length=1, max_length=255)
    since: UtcTime | None = None
    until: UtcTime | None = None
    cascade: bool = True
    dry_run: bool = False
    reason: str | None = Field(default=None, max_length=4096)
    requested_by: str | None = Field(default=None, max_length=255)
    force: bool = False
    issued_at: UtcTime

    @model_validator(mode="after")
    def _names_one_deployment(self) -> RollbackSignal:
        by_service = self.service is not None or self.service_version is not None
        if self.deployment_id is None and not by_service:
            raise ValueError("name the deployment: deployment_id, or service and service_version")
        if by_service and (self.service is None or self.service_version is None):
            raise ValueError("service and service_version must be given together")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must not be after until")
        # PostgreSQL cannot store NUL in text: such a signal would fail in the
        # ledger instead of being rejected with a reason.
        if any(isinstance(v, str) and "\x00" in v for v in self.__dict__.values()):
            raise ValueError("text fields must not contain NUL characters")
        return self

    @property
    def record_key(self) -> str:
        """Kafka record key: the deployment id, else the service."""
        return self.deployment_id or str(self.service)

    def canonical_bytes(self) -> bytes:
        """The canonical JSON bytes Backout's own publishers send and sign."""
        return canonical_json(self.model_dump(mode="json", exclude_none=True))


def canonical_json(value: Any) -> bytes:
    """Serialise a JSON value canonically: sorted keys, compact separators, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(value: bytes, key: str) -> str:
    """The `backout-signature` header value for record bytes `value`."""
    digest = hmac.new(key.encode(), value, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify_signature(value: bytes, header: bytes | str | None, key: str) -> str | None:
    """Check a signature header against the record bytes exactly as received.

    Returns:
        None when valid, otherwise a readable reason.
    """
    if header is None:
        return f"missing {SIGNATURE_HEADER} header (signals must be signed)"
    text = header.decode("utf-8", "replace") if isinstance(header, bytes) else header
    if not text.startswith(SIGNATURE_PREFIX):
        return f"{SIGNATURE_HEADER} must look like 'sha256=<hex>'"
    if not hmac.compare_digest(text, sign(value, key)):
        return f"{SIGNATURE_HEADER} does not match the record (wrong key or altered signal)"
    return None
