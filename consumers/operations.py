"""Operator commands that work on the ledger directly: plan, deployments,
retry, skip, pause, resume.

They need `BACKOUT_DATABASE_URL` (and `BACKOUT_SAGAS` for planning). State
changes land in the ledger; the worker notices them (runs poll the ledger,
and the worker re-checks unfinished rollbacks every few seconds).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url

from consumers.settings import Settings
from sagas.clock import SystemClock
from sagas.engine import BlastRadius, RollbackEngine
from sagas.errors import BackoutError, LedgerError
from sagas.ledger import DeploymentSummary, Ledger
from sagas.ledger.connection import display_url
from sagas.planner import Plan
from sagas.registry import load_registry
from schemas import RollbackSignal, RollbackState


class _NoCommands:
    async def send(self, topic: str, value: bytes, key: bytes | None, headers: Any) -> None:
        raise BackoutError("operator commands never send compensation commands")


@asynccontextmanager
async def open_ledger(settings: Settings) -> AsyncIterator[Ledger]:
    """Open the configured ledger, refusing to create a SQLite file that is not there."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        from pathlib import Path

        # A one-shot CLI check before any I/O starts; nothing else runs on this loop.
        if not Path(str(url.database)).exists():  # noqa: ASYNC240
            raise BackoutError(
                f"ledger database {url.database} does not exist "
                "(set BACKOUT_DATABASE_URL to the worker's ledger)"
            )
    ledger = Ledger(settings.database_url)
    try:
        await ledger.ping()
        if not await ledger.has_schema():
            raise BackoutError(
                f"{display_url(settings.database_url)} holds no Backout ledger: no worker "
                "has run against it (set BACKOUT_DATABASE_URL to the worker's ledger)"
            )
        yield ledger
    finally:
        await ledger.close()


@dataclass(frozen=True, slots=True)
class PlanReport:
    """A dry-run plan, as `backout plan` shows it."""

    signal: RollbackSignal
    radius: BlastRadius
    plan: Plan
    guard: int


async def plan_signal(settings: Settings, signal: RollbackSignal) -> PlanReport:
    """Plan a rollback from the ledger without recording or sending anything."""
    registry = load_registry(settings.saga_modules)
    async with open_ledger(settings) as ledger:
        engine = RollbackEngine(ledger, registry, commands=_NoCommands(), clock=SystemClock())
        radius, plan = await engine.plan(signal)
    return PlanReport(signal, radius, plan, settings.max_compensations)


async def deployments(settings: Settings) -> list[DeploymentSummary]:
    """Every tracked deployment with its event counts."""
    async with open_ledger(settings) as ledger:
        return await ledger.list_deployments()


async def retry(settings: Settings, key: str) -> list[str]:
    """A failed (or blocked) compensation gets a fresh attempt budget; its rollbacks reopen."""
    async with open_ledger(settings) as ledger:
        now = SystemClock().now()
        await ledger.retry_compensation(key, now=now)
        return await _reopen(ledger, key)


async def skip(settings: Settings, key: str, reason: str) -> list[str]:
    """A compensation is given up on purpose, with a reason; its rollbacks go on."""
    if not reason.strip():
        raise LedgerError("skipping a compensation needs --reason")
    async with open_ledger(settings) as ledger:
        now = SystemClock().now()
        await ledger.skip_compensation(key, reason=reason, now=now)
        return await _reopen(ledger, key)


async def _reopen(ledger: Ledger, key: str) -> list[str]:
    reopened = []
    for rollback_id in await ledger.rollbacks_of(key):
        if await ledger.set_rollback_state(
            rollback_id,
            RollbackState.RUNNING,
            now=SystemClock().now(),
            only_from=[RollbackState.FAILED],
        ):
            reopened.append(rollback_id)
    return reopened


async def pause(settings: Settings, rollback_id: str) -> None:
    """Stop starting compensations of a running rollback (in-flight ones finish)."""
    async with open_ledger(settings) as ledger:
        record = await ledger.require_rollback(rollback_id)
        if not await ledger.set_rollback_state(
            rollback_id, RollbackState.PAUSED, now=SystemClock().now(), only_from=["running"]
        ):
            raise LedgerError(f"rollback {rollback_id!r} is {record.state}, not running")


async def resume(settings: Settings, rollback_id: str) -> None:
    """Continue a paused or failed rollback."""
    async with open_ledger(settings) as ledger:
        record = await ledger.require_rollback(rollback_id)
        if not await ledger.set_rollback_state(
            rollback_id,
            RollbackState.RUNNING,
            now=SystemClock().now(),
            only_from=["paused", "failed"],
        ):
            raise LedgerError(f"rollback {rollback_id!r} is {record.state}, not paused or failed")


async def retire(settings: Settings, deployment_id: str) -> list[str]:
    """The deployment is gone: stop compensating its late events now."""
    async with open_ledger(settings) as ledger:
        return await ledger.end_quarantine(deployment_id, now=SystemClock().now())
