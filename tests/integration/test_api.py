"""The HTTP API over a real ledger, a real engine and the real broker.

The app is served by aiohttp's TestServer; the runtime behind it is an
`ApiRuntime` (tests/support/api_runtime.py): the same ledger, engine and
producer a worker holds, without faust.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumers import webcore
from consumers.api import build_web_app
from consumers.settings import Settings
from sagas.ledger import CompensationState
from schemas.dlq import DeadLetter
from schemas.signal import SIGNATURE_HEADER, RollbackSignal, verify_signature
from schemas.status import RollbackState
from tests.support.api_runtime import ApiRuntime, Controls, driven_saga, read_records
from tests.support.names import unique_name
from tests.support.waiting import wait_for

TOKEN = "t0ken-for-tests"
SIGNAL_KEY = "signing-key-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 4096

# Every mutating endpoint, with a body it would accept.
MUTATING: list[tuple[str, dict[str, Any]]] = [
    ("/api/rollbacks", {"deployment_id": "svc-1.0"}),
    ("/api/rollbacks/some-id/pause", {}),
    ("/api/rollbacks/some-id/resume", {}),
    ("/api/compensations/some-key/retry", {}),
    ("/api/compensations/some-key/skip", {"reason": "done by hand"}),
    ("/api/alertmanager", {"version": "4", "alerts": []}),
    ("/api/flagger", {"name": "podinfo", "namespace": "test", "phase": "Progressing"}),
    ("/api/argo-rollouts", {"event": "rollout-updated", "rollout": "shop"}),
]


def make_settings(bootstrap: str, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker": f"kafka://{bootstrap}",
        "database_url": database_url,
        "topic_prefix": unique_name("api") + ".",
        "api_token": TOKEN,
        "signal_key": SIGNAL_KEY,
        "web_host": "0.0.0.0",
        "max_body_bytes": BODY_LIMIT,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def controls() -> Controls:
    return Controls()


@pytest.fixture
def settings(kafka_bootstrap: str, sqlite_url: str) -> Settings:
    return make_settings(kafka_bootstrap, sqlite_url)


@pytest.fixture
async def runtime(settings: Settings, controls: Controls) -> AsyncIterator[ApiRuntime]:
    runtime = await ApiRuntime.open(settings, [driven_saga(controls)])
    try:
        yield runtime
    finally:
        await runtime.close()


@pytest.fixture
async def client(runtime: ApiRuntime) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_web_app(runtime.settings, runtime))) as client:
        yield client


async def serve(runtime: ApiRuntime) -> TestClient:
    client = TestClient(TestServer(build_web_app(runtime.settings, runtime)))
    await client.start_server()
    return client


async def start_rollback(runtime: ApiRuntime, deployment_id: str) -> str:
    signal = RollbackSignal(
        signal_id=str(uuid.uuid4()), deployment_id=deployment_id, issued_at=datetime.now(UTC)
    )
    await runtime.engine.handle_signal(signal)
    return signal.signal_id


async def state_of(runtime: ApiRuntime, rollback_id: str) -> str:
    return (await runtime.ledger.require_rollback(rollback_id)).state


async def error_of(response: Any, status: int) -> str:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


# ------------------------------------------------------------------------- health


async def test_health_reports_ledger_and_broker(client: TestClient) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "checks": {"ledger": "ok", "broker": "ok"}}


async def test_health_is_503_until_ready(client: TestClient, runtime: ApiRuntime) -> None:
    runtime.is_ready = False
    response = await client.get("/health")
    assert response.status == 503
    assert (await response.json())["status"] == "starting"
    assert "starting" in await error_of(await client.get("/api/rollbacks"), 503)


async def test_health_is_503_when_the_broker_is_gone(
    client: TestClient, runtime: ApiRuntime
) -> None:
    assert runtime.publisher is not None
    await runtime.publisher.stop()
    response = await client.get("/health")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["ledger"] == "ok"
    assert body["checks"]["broker"].startswith("unreachable")


async def test_metrics_are_prometheus_text(client: TestClient) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "backout_" in await response.text()


# -------------------------------------------------------------------------- reads


async def test_deployments_lists_tracked_deployments(
    client: TestClient, runtime: ApiRuntime
) -> None:
    assert await (await client.get("/api/deployments")).json() == []
    await runtime.track("shop-2.0", "Step", "Step", "Emailed", service="shop", version="2.0")
    response = await client.get("/api/deployments")
    assert response.status == 200
    [deployment] = await response.json()
    assert deployment["deployment_id"] == "shop-2.0"
    assert deployment["service"] == "shop"
    assert deployment["service_version"] == "2.0"
    assert deployment["events"] == 3
    assert deployment["first_event_at"].endswith("Z")


async def test_rollbacks_lists_statuses_newest_first(
    client: TestClient, runtime: ApiRuntime, controls: Controls
) -> None:
    assert await (await client.get("/api/rollbacks")).json() == []
    await runtime.track("svc-1.0", "Step", "Step")
    rollback_id = await start_rollback(runtime, "svc-1.0")
    await wait_for(lambda: len(controls.started) >= 1, message="a compensation started")
    response = await client.get("/api/rollbacks")
    assert response.status == 200
    [summary] = await response.json()
    assert summary["rollback_id"] == rollback_id
    assert summary["deployment_id"] == "svc-1.0"
    assert summary["state"] == "running"
    assert summary["planned"] == 2
    assert summary["applied"] == 0
    controls.release(2)
    await wait_for(
        lambda: _state_is(client, rollback_id, "completed"), message="completed via the API"
    )
    [done] = await (await client.get("/api/rollbacks?limit=1")).json()
    assert (done["planned"], done["applied"], done["state"]) == (2, 2, "completed")


async def _state_is(client: TestClient, rollback_id: str, state: str) -> bool:
    body = await (await client.get(f"/api/rollbacks/{rollback_id}")).json()
    return bool(body["state"] == state)


@pytest.mark.parametrize("query", ["limit=abc", "limit=0", "limit=100000"])
async def test_rollbacks_rejects_a_bad_limit(client: TestClient, query: str) -> None:
    assert "limit" in await error_of(await client.get(f"/api/rollbacks?{query}"), 400)


async def test_rollback_detail_has_compensations_manual_actions_and_uncovered_types(
    kafka_bootstrap: str, ledger_url: str
) -> None:
    controls = Controls()
    runtime = await ApiRuntime.open(
        make_settings(kafka_bootstrap, ledger_url), [driven_saga(controls)]
    )
    client = await serve(runtime)
    try:
        events = await runtime.track("svc-3.1", "Step", "Emailed", "Mystery", "Step")
        rollback_id = await start_rollback(runtime, "svc-3.1")
        await wait_for(lambda: len(controls.started) == 2, message="both steps started")
        controls.release(1)
        await wait_for(lambda: _applied(client, rollback_id, 1), message="one compensation applied")

        response = await client.get(f"/api/rollbacks/{rollback_id}")
        assert response.status == 200
        detail = await response.json()
        assert detail["state"] == "running"
        assert detail["signal"]["deployment_id"] == "svc-3.1"
        assert detail["compensations_total"] == 2
        compensations = detail["compensations"]
        assert [c["position"] for c in compensations] == sorted(
            c["position"] for c in compensations
        )
        assert {c["event_id"] for c in compensations} == {events[0].event_id, events[3].event_id}
        assert sorted(c["state"] for c in compensations) == ["applied", "running"]
        assert all(c["saga"] == "driven" and c["step"] for c in compensations)
        [manual] = detail["manual_actions"]
        assert manual["event_type"] == "Emailed"
        assert manual["detail"] == "Send the customer a correction e-mail"
        assert detail["uncovered_types"] == [{"event_type": "Mystery", "events": 1}]
        assert (detail["manual"], detail["uncovered"]) == (1, 1)

        limited = await (await client.get(f"/api/rollbacks/{rollback_id}?limit=1")).json()
        assert len(limited["compensations"]) == 1
        assert limited["compensations_total"] == 2

        controls.release(1)
        await wait_for(
            lambda: _state_is(client, rollback_id, "completed_with_warnings"),
            message="completed with warnings",
        )
    finally:
        await client.close()
        await runtime.close()


async def _applied(client: TestClient, rollback_id: str, count: int) -> bool:
    body = await (await client.get(f"/api/rollbacks/{rollback_id}")).json()
    return bool(body["applied"] >= count)


async def test_rollback_detail_of_an_unknown_id_is_404(client: TestClient) -> None:
    assert "unknown rollback 'nope'" in await error_of(await client.get("/api/rollbacks/nope"), 404)


async def test_dead_letters_lists_the_newest_first(client: TestClient, runtime: ApiRuntime) -> None:
    assert await (await client.get("/api/dead-letters")).json() == []
    for offset in (7, 8):
        await runtime.ledger.record_dead_letters(
            [
                DeadLetter(
                    error=f"invalid EventEnvelope at {offset}",
                    source_topic="orders.events",
                    source_partition=1,
                    source_offset=offset,
                )
            ],
            now=datetime.now(UTC),
        )
    response = await client.get("/api/dead-letters")
    assert response.status == 200
    letters = await response.json()
    assert [(d["topic"], d["offset"]) for d in letters] == [
        ("orders.events", 8),
        ("orders.events", 7),
    ]
    assert letters[0]["error"] == "invalid EventEnvelope at 8"
    assert len(await (await client.get("/api/dead-letters?limit=1")).json()) == 1
    assert "limit" in await error_of(await client.get("/api/dead-letters?limit=-1"), 400)


async def test_unknown_paths_and_methods_answer_json(client: TestClient) -> None:
    assert "no such endpoint" in await error_of(await client.get("/api/nothing-here"), 404)
    response = await client.delete("/api/rollbacks")
    await error_of(response, 405)
    assert "POST" in response.headers["Allow"]


# ---------------------------------------------------------------- POST rollbacks


async def test_post_rollback_publishes_a_signed_signal(
    client: TestClient, settings: Settings, kafka_bootstrap: str
) -> None:
    response = await client.post(
        "/api/rollbacks",
        json={"deployment_id": "orders-2.4.0-7f3a", "reason": "error rate", "dry_run": True},
        headers=AUTH,
    )
    assert response.status == 202, await response.text()
    body = await response.json()
    rollback_id = body["rollback_id"]
    assert uuid.UUID(rollback_id).version == 4
    assert body["status_url"] == f"/api/rollbacks/{rollback_id}"

    [record] = await read_records(kafka_bootstrap, settings.signals_topic, count=1)
    assert record.key == b"orders-2.4.0-7f3a"
    headers = dict(record.headers)
    assert verify_signature(record.value, headers[SIGNATURE_HEADER], SIGNAL_KEY) is None
    assert "traceparent" in headers
    signal = RollbackSignal.model_validate_json(record.value)
    assert signal.signal_id == rollback_id
    assert signal.deployment_id == "orders-2.4.0-7f3a"
    assert signal.requested_by == "api"
    assert signal.reason == "error rate"
    assert signal.dry_run is True
    assert abs((datetime.now(UTC) - signal.issued_at).total_seconds()) < 60
    # Canonical bytes: exactly what the CLI would have sent for this signal.
    assert record.value == signal.canonical_bytes()


async def test_post_rollback_keeps_given_fields(
    client: TestClient, settings: Settings, kafka_bootstrap: str
) -> None:
    fields = {
        "signal_id": "my-rollback-1",
        "service": "payments",
        "service_version": "3.1.0",
        "requested_by": "alice",
        "issued_at": "2026-01-31T12:00:00Z",
        "cascade": False,
        "unknown_extra": "ignored",
    }
    response = await client.post("/api/rollbacks", json=fields, headers=AUTH)
    assert response.status == 202
    assert (await response.json())["rollback_id"] == "my-rollback-1"
    [record] = await read_records(kafka_bootstrap, settings.signals_topic, count=1)
    assert record.key == b"payments"
    signal = RollbackSignal.model_validate_json(record.value)
    assert (signal.service, signal.service_version, signal.requested_by) == (
        "payments",
        "3.1.0",
        "alice",
    )
    assert signal.issued_at == datetime(2026, 1, 31, 12, tzinfo=UTC)
    assert signal.cascade is False


async def test_post_rollback_without_a_worker_producer_uses_a_short_lived_one(
    settings: Settings, kafka_bootstrap: str
) -> None:
    runtime = await ApiRuntime.open(settings, publisher=False)
    client = await serve(runtime)
    try:
        response = await client.post("/api/rollbacks", json={"deployment_id": "d-1"}, headers=AUTH)
        assert response.status == 202
        rollback_id = (await response.json())["rollback_id"]
    finally:
        await client.close()
        await runtime.close()
    [record] = await read_records(kafka_bootstrap, settings.signals_topic, count=1)
    assert RollbackSignal.model_validate_json(record.value).signal_id == rollback_id
    assert (
        verify_signature(record.value, dict(record.headers)[SIGNATURE_HEADER], SIGNAL_KEY) is None
    )


async def test_post_rollback_is_503_when_the_broker_is_gone(
    client: TestClient, runtime: ApiRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webcore, "PUBLISH_TIMEOUT", 0.5)
    assert runtime.publisher is not None
    await runtime.publisher.stop()
    message = await error_of(
        await client.post("/api/rollbacks", json={"deployment_id": "d-1"}, headers=AUTH), 503
    )
    assert "could not publish" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "empty"),
        (b"{}", "name the deployment"),
        (b'{"service": "orders"}', "service and service_version"),
        (b'{"deployment_id": "d", "issued_at": "2026-01-31T12:00:00"}', "issued_at"),
        (
            b'{"deployment_id": "d", "since": "2026-02-01T00:00:00Z",'
            b' "until": "2026-01-01T00:00:00Z"}',
            "since must not be after until",
        ),
        (b'{"deployment_id": "d", "dry_run": "perhaps"}', "dry_run"),
        (b'{"deployment_id": ""}', "deployment_id"),
    ],
)
async def test_post_rollback_rejects_bad_input(
    client: TestClient, body: bytes, expected: str
) -> None:
    response = await client.post(
        "/api/rollbacks", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert expected in await error_of(response, 400)


async def test_post_rollback_from_loopback_needs_no_token_when_none_is_set(
    kafka_bootstrap: str, sqlite_url: str
) -> None:
    settings = make_settings(kafka_bootstrap, sqlite_url, api_token=None, web_host="127.0.0.1")
    runtime = await ApiRuntime.open(settings)
    client = await serve(runtime)
    try:
        response = await client.post("/api/rollbacks", json={"deployment_id": "d-1"})
        assert response.status == 202, await response.text()
    finally:
        await client.close()
        await runtime.close()


# ------------------------------------------------------------------ pause/resume


async def test_pause_and_resume_a_running_rollback(
    client: TestClient, runtime: ApiRuntime, controls: Controls
) -> None:
    await runtime.track("svc-1.0", "Step", "Step", "Step")
    rollback_id = await start_rollback(runtime, "svc-1.0")
    await wait_for(lambda: controls.started, message="a compensation started")

    response = await client.post(f"/api/rollbacks/{rollback_id}/pause", headers=AUTH)
    assert response.status == 200, await response.text()
    assert (await response.json())["state"] == "paused"
    assert await state_of(runtime, rollback_id) == RollbackState.PAUSED
    controls.release(3)
    assert "not running" in await error_of(
        await client.post(f"/api/rollbacks/{rollback_id}/pause", headers=AUTH), 409
    )

    response = await client.post(f"/api/rollbacks/{rollback_id}/resume", headers=AUTH)
    assert response.status == 200
    assert (await response.json())["state"] in ("running", "completed")
    await wait_for(
        lambda: _state_is(client, rollback_id, "completed"), message="completed after resume"
    )
    assert "not paused or failed" in await error_of(
        await client.post(f"/api/rollbacks/{rollback_id}/resume", headers=AUTH), 409
    )


@pytest.mark.parametrize("action", ["pause", "resume"])
async def test_pause_or_resume_of_an_unknown_rollback_is_404(
    client: TestClient, action: str
) -> None:
    response = await client.post(f"/api/rollbacks/nope/{action}", headers=AUTH)
    assert "unknown rollback 'nope'" in await error_of(response, 404)


# ------------------------------------------------------------------- retry/skip


async def _failed_compensation(client: TestClient, runtime: ApiRuntime) -> tuple[str, str]:
    await runtime.track("svc-9.9", "Broken")
    rollback_id = await start_rollback(runtime, "svc-9.9")
    await wait_for(lambda: _state_is(client, rollback_id, "failed"), message="rollback failed")
    [item] = await runtime.ledger.plan_items(rollback_id)
    assert item.state == CompensationState.FAILED
    return rollback_id, item.idempotency_key


async def test_retry_a_failed_compensation(client: TestClient, runtime: ApiRuntime) -> None:
    rollback_id, key = await _failed_compensation(client, runtime)
    response = await client.post(f"/api/compensations/{key}/retry", headers=AUTH)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["idempotency_key"] == key
    assert body["rollbacks"] == [rollback_id]
    assert body["reopened"] == [rollback_id]
    # The handler fails for good again: the rollback ends failed again.
    await wait_for(lambda: _state_is(client, rollback_id, "failed"), message="failed again")
    item = await runtime.ledger.get_compensation(key)
    assert item is not None
    assert item.attempts == 1


async def test_skip_a_failed_compensation_completes_the_rollback(
    client: TestClient, runtime: ApiRuntime
) -> None:
    rollback_id, key = await _failed_compensation(client, runtime)
    response = await client.post(
        f"/api/compensations/{key}/skip", json={"reason": "refunded by hand"}, headers=AUTH
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["state"], body["skip_reason"]) == ("skipped", "refunded by hand")
    await wait_for(lambda: _state_is(client, rollback_id, "completed"), message="completed")
    # Skipped is final: neither a second skip nor a retry is a legal change.
    again = await client.post(
        f"/api/compensations/{key}/skip", json={"reason": "again"}, headers=AUTH
    )
    assert "cannot skip" in await error_of(again, 409)
    assert "cannot retry" in await error_of(
        await client.post(f"/api/compensations/{key}/retry", headers=AUTH), 409
    )


@pytest.mark.parametrize("body", [b"", b"{}", b'{"reason": "   "}', b'{"reason": 42}', b"not json"])
async def test_skip_needs_a_reason(client: TestClient, body: bytes) -> None:
    response = await client.post(
        "/api/compensations/whatever/skip",
        data=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    await error_of(response, 400)


@pytest.mark.parametrize(("action", "body"), [("retry", None), ("skip", {"reason": "by hand"})])
async def test_retry_or_skip_of_an_unknown_compensation_is_404(
    client: TestClient, action: str, body: dict[str, str] | None
) -> None:
    response = await client.post(f"/api/compensations/nope/{action}", json=body, headers=AUTH)
    assert "unknown compensation 'nope'" in await error_of(response, 404)


# ------------------------------------------------------------------ access, limits


@pytest.mark.parametrize(("path", "body"), MUTATING, ids=[p for p, _ in MUTATING])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_mutating_endpoints_refuse_a_missing_or_wrong_token(
    client: TestClient, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    response = await client.post(path, json=body, headers=headers)
    assert "token" in await error_of(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("path", "body"), MUTATING, ids=[p for p, _ in MUTATING])
async def test_mutating_endpoints_are_disabled_without_a_token_off_loopback(
    kafka_bootstrap: str, sqlite_url: str, path: str, body: dict[str, Any]
) -> None:
    settings = make_settings(kafka_bootstrap, sqlite_url, api_token=None, web_host="0.0.0.0")
    runtime = await ApiRuntime.open(settings, publisher=False)
    client = await serve(runtime)
    try:
        response = await client.post(path, json=body, headers=AUTH)
        assert "BACKOUT_API_TOKEN" in await error_of(response, 403)
        # Reads stay open.
        assert (await client.get("/api/rollbacks")).status == 200
    finally:
        await client.close()
        await runtime.close()


BODY_PATHS = [
    "/api/rollbacks",
    "/api/compensations/k/skip",
    "/api/alertmanager",
    "/api/flagger",
    "/api/argo-rollouts",
]


@pytest.mark.parametrize("path", BODY_PATHS)
async def test_a_body_over_the_limit_is_413(client: TestClient, path: str) -> None:
    big = json.dumps({"deployment_id": "d", "reason": "x" * BODY_LIMIT}).encode()
    response = await client.post(
        path, data=big, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert "too large" in await error_of(response, 413)


async def test_a_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"deployment_id": "d", "reason": "'
        for _ in range(8):
            yield b"x" * 1024
        yield b'"}'

    response = await client.post(
        "/api/rollbacks", data=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert "too large" in await error_of(response, 413)


# -------------------------------------------------------------------- status page


async def test_status_page_and_assets_are_served(client: TestClient) -> None:
    for path in ("/", "/rollbacks/some-id"):
        response = await client.get(path)
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        html = await response.text()
        assert '<meta name="viewport"' in html
        assert "/static/app.js" in html
        assert "http://" not in html
        assert "https://" not in html
    for name, kind in [
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        response = await client.get(f"/static/{name}")
        assert response.status == 200
        assert response.content_type == kind
    await error_of(await client.get("/static/index.html.bak"), 404)
    await error_of(await client.get("/static/..%2Fapi.py"), 404)
