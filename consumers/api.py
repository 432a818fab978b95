"""The HTTP API (aiohttp): health, metrics, deployments, rollbacks, operator actions.

Read endpoints are open (the status page uses them); mutating endpoints need
`Authorization: Bearer $BACKOUT_API_TOKEN` (see `webcore.require_write_access`).
Errors are `{"error": "..."}` with 400/401/403/404/409/413/503.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from consumers import metrics as _metrics  # noqa: F401  (defines the series /metrics serves)
from consumers import page, webhooks
from consumers.settings import Settings
from consumers.webcore import (
    RUNTIME_KEY,
    SETTINGS_KEY,
    ApiError,
    error_middleware,
    json_response,
    publish,
    query_int,
    read_json_object,
    require_ready,
    require_write_access,
    runtime_of,
)
from sagas.engine import rollback_status
from sagas.ledger import CompensationRecord, Counts, RollbackRecord
from schemas._base import utc_now
from schemas.errors import describe_validation_error
from schemas.signal import RollbackSignal
from schemas.status import RollbackStatus

if TYPE_CHECKING:
    from consumers.runtime import Runtime
    from sagas.engine import RollbackEngine

HEALTH_TIMEOUT = 2.0  # seconds each dependency may take to answer /health

__all__ = ["build_web_app"]


# -------------------------------------------------------------------------- health


async def _check(probe: Any) -> str:
    try:
        await asyncio.wait_for(probe, HEALTH_TIMEOUT)
    except TimeoutError:
        return f"unreachable: no answer within {HEALTH_TIMEOUT:g}s"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"
    return "ok"


async def health(request: web.Request) -> web.Response:
    """200 when the ledger and the broker answer and the tracker runs; 503 otherwise."""
    runtime = runtime_of(request)
    if not runtime.is_ready or runtime.ledger is None:
        return json_response({"status": "starting", "checks": {}}, status=503)
    checks = {"ledger": await _check(runtime.ledger.ping())}
    publisher = getattr(runtime, "publisher", None)
    checks["broker"] = (
        await _check(publisher.ping(HEALTH_TIMEOUT)) if publisher is not None else "no producer"
    )
    tracker = getattr(runtime, "tracker", None)
    if tracker is not None:
        checks["tracker"] = "ok" if tracker.state == "running" else f"not running ({tracker.state})"
    healthy = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ok" if healthy else "degraded", "checks": checks}, 200 if healthy else 503
    )


async def metrics(_request: web.Request) -> web.Response:
    """Prometheus text format."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


# --------------------------------------------------------------------------- reads


async def deployments(request: web.Request) -> web.Response:
    """Tracked deployments with event counts by type and version."""
    runtime = require_ready(request)
    assert runtime.ledger is not None
    return json_response([asdict(d) for d in await runtime.ledger.list_deployments()])


def _status(record: RollbackRecord, counts: Counts) -> RollbackStatus:
    return rollback_status(record, counts, updated_at=record.updated_at)


def _summary(record: RollbackRecord, counts: Counts) -> dict[str, Any]:
    """A status record plus what the page shows about a rollback."""
    return {
        **_status(record, counts).model_dump(mode="json"),
        "pending": counts.pending,
        "running": counts.running,
        "blocked": counts.blocked,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "reason": record.signal.get("reason"),
        "requested_by": record.signal.get("requested_by"),
    }


async def rollbacks(request: web.Request) -> web.Response:
    """Recent rollbacks, newest first, with their status counts (`?limit=`, default 100)."""
    runtime = require_ready(request)
    assert runtime.ledger is not None
    limit = query_int(request, "limit", 100, low=1, high=1000)
    records = await runtime.ledger.list_rollbacks(limit=limit)
    return json_response([_summary(r, await runtime.ledger.counts(r.rollback_id)) for r in records])


def _compensation(item: CompensationRecord) -> dict[str, Any]:
    return {
        "position": item.position,
        "idempotency_key": item.idempotency_key,
        "event_id": item.event_id,
        "event_type": item.event_type,
        "saga": item.saga,
        "step": item.step,
        "state": item.state.value,
        "attempts": item.attempts,
        "last_error": item.last_error,
        "skip_reason": item.skip_reason,
        "confirm_type": item.confirm_type,
        "confirm_deadline": item.confirm_deadline,
        "next_attempt_at": item.next_attempt_at,
        "late": item.late,
    }


async def _rollback_or_404(runtime: Runtime, rollback_id: str) -> RollbackRecord:
    assert runtime.ledger is not None
    record = await runtime.ledger.get_rollback(rollback_id)
    if record is None:
        raise ApiError(404, f"unknown rollback {rollback_id!r}")
    return record


async def rollback_detail(request: web.Request) -> web.Response:
    """One rollback: status, compensations in plan order, manual actions, uncovered types.

    `?limit=` caps the compensations listed (default 1000); `compensations_total`
    always has the full number.
    """
    runtime = require_ready(request)
    assert runtime.ledger is not None
    limit = query_int(request, "limit", 1000, low=1, high=100_000)
    record = await _rollback_or_404(runtime, request.match_info["rollback_id"])
    counts = await runtime.ledger.counts(record.rollback_id)
    items = await runtime.ledger.plan_items(record.rollback_id)
    uncovered_types = Counter(str(u.get("event_type")) for u in record.uncovered)
    return json_response(
        {
            **_summary(record, counts),
            "signal": record.signal,
            "compensations_total": len(items),
            "compensations": [_compensation(i) for i in items[:limit]],
            "manual_actions": record.manual,
            "uncovered_types": [
                {"event_type": name, "events": n} for name, n in sorted(uncovered_types.items())
            ],
            "uncovered_events": record.uncovered,
        }
    )


async def dead_letters(request: web.Request) -> web.Response:
    """The most recent dead letters, newest first (`?limit=`, default 100)."""
    runtime = require_ready(request)
    assert runtime.ledger is not None
    limit = query_int(request, "limit", 100, low=1, high=1000)
    return json_response(await runtime.ledger.list_dead_letters(limit=limit))


# ------------------------------------------------------------------------- actions


async def create_rollback(request: web.Request) -> web.Response:
    """Publish a rollback signal; 202 with its id (the rollback runs asynchronously).

    The body holds the signal's fields; `signal_id` (a new UUID), `issued_at`
    (now) and `requested_by` ("api") are filled in when missing.
    """
    require_write_access(request)
    body = await read_json_object(request)
    body.setdefault("signal_id", str(uuid.uuid4()))
    body.setdefault("issued_at", utc_now().isoformat())
    body.setdefault("requested_by", "api")
    try:
        signal = RollbackSignal.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, describe_validation_error("RollbackSignal", exc)) from None
    await publish(request, signal)
    return json_response(
        {
            "rollback_id": signal.signal_id,
            "status_url": f"/api/rollbacks/{signal.signal_id}",
        },
        status=202,
    )


async def _after_action(runtime: Runtime, rollback_id: str) -> web.Response:
    assert runtime.ledger is not None
    record = await runtime.ledger.require_rollback(rollback_id)
    return json_response(_summary(record, await runtime.ledger.counts(rollback_id)))


def _operator(request: web.Request) -> tuple[Runtime, RollbackEngine]:
    """The runtime and engine for a mutating endpoint: 401/403 without access, 503 if not up."""
    require_write_access(request)
    runtime = require_ready(request)
    assert runtime.engine is not None
    return runtime, runtime.engine


async def pause(request: web.Request) -> web.Response:
    """Pause a running rollback (in-flight compensations finish)."""
    runtime, engine = _operator(request)
    record = await _rollback_or_404(runtime, request.match_info["rollback_id"])
    await engine.pause(record.rollback_id)
    return await _after_action(runtime, record.rollback_id)


async def resume(request: web.Request) -> web.Response:
    """Resume a paused (or failed, after retries/skips) rollback."""
    runtime, engine = _operator(request)
    record = await _rollback_or_404(runtime, request.match_info["rollback_id"])
    await engine.resume_rollback(record.rollback_id)
    return await _after_action(runtime, record.rollback_id)


async def _compensation_or_404(runtime: Runtime, key: str) -> None:
    assert runtime.ledger is not None
    if await runtime.ledger.get_compensation(key) is None:
        raise ApiError(404, f"unknown compensation {key!r}")


async def _compensation_response(runtime: Runtime, key: str, reopened: list[str]) -> web.Response:
    assert runtime.ledger is not None
    item = await runtime.ledger.get_compensation(key)
    assert item is not None
    return json_response(
        {
            "idempotency_key": key,
            "state": item.state.value,
            "skip_reason": item.skip_reason,
            "rollbacks": await runtime.ledger.rollbacks_of(key),
            "reopened": reopened,
        }
    )


async def retry(request: web.Request) -> web.Response:
    """Give a failed compensation a fresh attempt budget; its rollbacks resume."""
    runtime, engine = _operator(request)
    key = request.match_info["key"]
    await _compensation_or_404(runtime, key)
    reopened = await engine.retry(key)
    return await _compensation_response(runtime, key, reopened)


async def skip(request: web.Request) -> web.Response:
    """Give up on a compensation on purpose; body `{"reason": "..."}` is required."""
    runtime, engine = _operator(request)
    key = request.match_info["key"]
    body = await read_json_object(request)
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError(400, 'skipping a compensation needs a reason: {"reason": "..."}')
    await _compensation_or_404(runtime, key)
    reopened = await engine.skip(key, reason.strip())
    return await _compensation_response(runtime, key, reopened)


# ---------------------------------------------------------------------------- app


def build_web_app(settings: Settings, runtime: Runtime) -> web.Application:
    """The aiohttp application of a worker: API, webhooks, status page, metrics."""
    # aiohttp refuses larger bodies itself (chunked ones included); handlers
    # also check Content-Length first so that the answer is a JSON 413.
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[RUNTIME_KEY] = runtime
    app[SETTINGS_KEY] = settings
    router = app.router
    router.add_get("/health", health)
    router.add_get("/metrics", metrics)
    router.add_get("/api/deployments", deployments)
    router.add_get("/api/rollbacks", rollbacks)
    router.add_post("/api/rollbacks", create_rollback)
    router.add_get("/api/rollbacks/{rollback_id}", rollback_detail)
    router.add_post("/api/rollbacks/{rollback_id}/pause", pause)
    router.add_post("/api/rollbacks/{rollback_id}/resume", resume)
    router.add_post("/api/compensations/{key}/retry", retry)
    router.add_post("/api/compensations/{key}/skip", skip)
    router.add_get("/api/dead-letters", dead_letters)
    webhooks.add_routes(router)
    page.add_routes(router)
    return app
