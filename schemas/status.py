"""Rollback status records on `backout.status` (DESIGN §2.4)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from schemas._base import UtcTime, WireModel


class RollbackState(StrEnum):
    """Lifecycle of a rollback."""

    ACCEPTED = "accepted"
    PLANNING = "planning"
    PLANNED = "planned"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    COMPLETED_WITH_WARNINGS = "completed_with_warnings"
    FAILED = "failed"
    REJECTED = "rejected"

    @property
    def is_terminal(self) -> bool:
        """True for states a rollback does not leave by itself."""
        return self in _TERMINAL


_TERMINAL = frozenset(
    {
        RollbackState.PLANNED,
        RollbackState.COMPLETED,
        RollbackState.COMPLETED_WITH_WARNINGS,
        RollbackState.FAILED,
        RollbackState.REJECTED,
    }
)


class RollbackStatus(WireModel):
    """One state change or progress tick of a rollback."""

    rollback_id: str
    deployment_id: str | None = None
    dry_run: bool = False
    state: RollbackState
    planned: int = Field(default=0, ge=0)
    applied: int = Field(default=0, ge=0)
    confirmed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    skipped: int = Field(default=0, ge=0)
    manual: int = Field(default=0, ge=0)
    uncovered: int = Field(default=0, ge=0)
    late: int = Field(default=0, ge=0)
    error: str | None = None
    updated_at: UtcTime
