"""HTTP API routes (aiohttp): health, metrics, deployments, rollbacks."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumers.settings import Settings

if TYPE_CHECKING:
    from consumers.runtime import Runtime

RUNTIME_KEY = web.AppKey("runtime", object)
SETTINGS_KEY = web.AppKey("settings", Settings)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, default=str))


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status=status)


def _runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME_KEY]  # type: ignore[return-value]


async def health(request: web.Request) -> web.Response:
    """Ready when the runtime started and the ledger answers."""
    runtime = _runtime(request)
    checks: dict[str, str] = {}
    if not runtime.is_ready or runtime.ledger is None:
        return _json({"status": "starting", "checks": checks}, status=503)
    try:
        await runtime.ledger.ping()
        checks["ledger"] = "ok"
    except Exception as exc:
        checks["ledger"] = f"unreachable: {exc}"
    checks["tracker"] = (
        "ok"
        if runtime.tracker is not None and runtime.tracker.state == "running"
        else "not running"
    )
    healthy = all(v == "ok" for v in checks.values())
    return _json(
        {"status": "ok" if healthy else "degraded", "checks": checks}, 200 if healthy else 503
    )


async def metrics(_request: web.Request) -> web.Response:
    """Prometheus text format."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def deployments(request: web.Request) -> web.Response:
    """Tracked deployments with event counts by type and version."""
    runtime = _runtime(request)
    if runtime.ledger is None:
        return _error("worker is starting", 503)
    return _json([asdict(d) for d in await runtime.ledger.list_deployments()])


async def rollbacks(request: web.Request) -> web.Response:
    """Recent rollbacks with their status counts."""
    runtime = _runtime(request)
    if runtime.engine is None or runtime.ledger is None:
        return _error("worker is starting", 503)
    records = await runtime.ledger.list_rollbacks(limit=100)
    statuses = [await runtime.engine.status_of(r.rollback_id) for r in records]
    return _json([s.model_dump(mode="json") for s in statuses])


async def rollback_detail(request: web.Request) -> web.Response:
    """One rollback: status, compensations in order, manual actions, uncovered events."""
    runtime = _runtime(request)
    if runtime.engine is None or runtime.ledger is None:
        return _error("worker is starting", 503)
    rollback_id = request.match_info["rollback_id"]
    record = await runtime.ledger.get_rollback(rollback_id)
    if record is None:
        return _error(f"unknown rollback {rollback_id!r}", 404)
    status = await runtime.engine.status_of(rollback_id)
    items = await runtime.ledger.plan_items(rollback_id)
    return _json(
        {
            **status.model_dump(mode="json"),
            "signal": record.signal,
            "compensations": [
                {
                    "idempotency_key": i.idempotency_key,
                    "event_id": i.event_id,
                    "event_type": i.event_type,
                    "saga": i.saga,
                    "step": i.step,
                    "state": i.state.value,
                    "attempts": i.attempts,
                    "last_error": i.last_error,
                    "position": i.position,
                    "late": i.late,
                }
                for i in items
            ],
            "manual_actions": record.manual,
            "uncovered_events": record.uncovered,
        }
    )


def build_web_app(settings: Settings, runtime: Runtime) -> web.Application:
    """The aiohttp application of a worker."""
    app = web.Application(client_max_size=256 * 1024)
    app[RUNTIME_KEY] = runtime
    app[SETTINGS_KEY] = settings
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/deployments", deployments)
    app.router.add_get("/api/rollbacks", rollbacks)
    app.router.add_get("/api/rollbacks/{rollback_id}", rollback_detail)
    return app
