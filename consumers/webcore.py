"""What every HTTP handler shares: JSON errors, access control, bodies, signal publishing.

Errors are raised as `ApiError` (or a Backout error) and turned into
`{"error": "..."}` responses by one middleware, so a handler never builds an
error response by hand.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from consumers.client import publish_signal, send_signal
from consumers.settings import Settings
from sagas.errors import LedgerError
from schemas._base import format_time

if TYPE_CHECKING:
    from consumers.runtime import Runtime

log = logging.getLogger(__name__)

RUNTIME_KEY = web.AppKey("runtime", object)
SETTINGS_KEY = web.AppKey("settings", Settings)
# Seconds a signal may take to reach the broker before the request fails with
# 503; below the 10 s that Alertmanager and Argo notifications wait by default.
PUBLISH_TIMEOUT = 8.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A request the API refuses, with its HTTP status and a readable message."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_time(value) if value.tzinfo else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON response; times as RFC 3339."""
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, default=_default))


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """`{"error": message}` with `status`."""
    response = json_response({"error": message}, status=status)
    response.headers.update(headers or {})
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as a JSON error with the right status code."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    except LedgerError as exc:
        # The engine and ledger refuse illegal state changes with LedgerError;
        # unknown ids are answered 404 by the handlers before they get here.
        return error_response(409, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, _too_large(request.app[SETTINGS_KEY].max_body_bytes))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        message = exc.reason if exc.status != 404 else f"no such endpoint: {request.path}"
        return error_response(exc.status, message, headers)
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return error_response(500, "internal error; the worker's log has the details")


def runtime_of(request: web.Request) -> Runtime:
    """The worker runtime serving this request."""
    return request.app[RUNTIME_KEY]  # type: ignore[return-value]  # AppKey holds `object`


def settings_of(request: web.Request) -> Settings:
    """The worker's settings."""
    return request.app[SETTINGS_KEY]


def require_ready(request: web.Request) -> Runtime:
    """The runtime, once its ledger and engine are up (503 before)."""
    runtime = runtime_of(request)
    if not runtime.is_ready or runtime.ledger is None or runtime.engine is None:
        raise ApiError(503, "the worker is starting; try again in a moment")
    return runtime


# -------------------------------------------------------------------------- access


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def require_write_access(request: web.Request) -> None:
    """Allow a mutating request, or raise 401/403.

    With `BACKOUT_API_TOKEN` set, the request must carry it as a bearer token.
    Without one, mutating endpoints are disabled, except on a server that
    listens on the loopback interface only (a developer's machine).
    """
    settings = settings_of(request)
    token = settings.api_token
    if not token:
        if is_loopback(settings.web_host):
            return
        raise ApiError(
            403,
            "mutating endpoints are disabled: set BACKOUT_API_TOKEN to enable them "
            f"(the server listens on {settings.web_host}, not on loopback only)",
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="backout"'}
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(
            401, "missing bearer token: send 'Authorization: Bearer <token>'", headers=challenge
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "wrong bearer token", headers=challenge)


# -------------------------------------------------------------------------- bodies


def _too_large(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes (BACKOUT_MAX_BODY_BYTES)"


async def read_json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object (400 if it is not one, 413 if too large)."""
    limit = settings_of(request).max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, _too_large(limit))
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, _too_large(limit)) from None
    if len(raw) > limit:
        raise ApiError(413, _too_large(limit))
    if not raw.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def query_int(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    """An integer query parameter within [low, high] (400 otherwise)."""
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"query parameter {name!r} must be between {low} and {high}")
    return value


# ------------------------------------------------------------------------- signals


async def publish(request: web.Request, signal: Any) -> None:
    """Publish a rollback signal as every Backout publisher does (canonical, signed).

    Uses the worker's producer when it has one; otherwise a short-lived one
    (`consumers.client.publish_signal`). A broker failure is a 503, so that
    webhook senders (Alertmanager, Argo) retry.
    """
    settings = settings_of(request)
    publisher = getattr(runtime_of(request), "publisher", None)
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            await _send(settings, publisher, signal)
    except Exception as exc:
        log.warning("could not publish signal %s", signal.signal_id, exc_info=True)
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ApiError(503, f"could not publish the rollback signal to Kafka: {problem}") from None


async def _send(settings: Settings, publisher: Any, signal: Any) -> None:
    if publisher is None:
        await publish_signal(settings, signal)
        return
    await send_signal(settings, signal, publisher.send)
