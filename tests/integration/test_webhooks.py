"""Alertmanager, Flagger and Argo Rollouts webhooks → rollback signals on the real broker.

Repeated notifications must never start a second rollback: the signal ids are
derived from the incident, and the engine dedupes by signal id. The last step
of the Alertmanager test feeds the published records to a real engine and
counts the rollbacks in the ledger.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumers.api import build_web_app
from consumers.settings import Settings
from schemas.signal import SIGNATURE_HEADER, RollbackSignal, verify_signature
from tests.support.api_runtime import ApiRuntime, Controls, driven_saga, read_records
from tests.support.names import unique_name
from tests.support.waiting import wait_for

TOKEN = "webhook-token"
SIGNAL_KEY = "webhook-signing-key"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def alertmanager_payload() -> dict[str, Any]:
    """What Alertmanager 0.27 posts: two firing alerts that name a deployment, one resolved."""
    common = {"backout": "rollback", "severity": "critical"}
    return {
        "version": "4",
        "groupKey": '{}/{backout="rollback"}:{deployment_id="orders-2.4.0-7f3a"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "backout",
        "groupLabels": {"deployment_id": "orders-2.4.0-7f3a"},
        "commonLabels": {"backout": "rollback"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    **common,
                    "alertname": "OrdersErrorRate",
                    "deployment_id": "orders-2.4.0-7f3a",
                },
                "annotations": {"summary": "5xx rate above 5% on orders 2.4.0"},
                "startsAt": "2026-01-31T12:00:00.000Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
                "fingerprint": "c2f0d5b6a1e9e7f3",
            },
            {
                "status": "firing",
                "labels": {
                    **common,
                    "alertname": "PaymentsLatency",
                    "service": "payments",
                    "version": "3.1.0",
                },
                "annotations": {"description": "p99 latency above 2s"},
                "startsAt": "2026-01-31T12:01:30.000Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
                "fingerprint": "0b9e3c1d2a4f5e6d",
            },
            {
                "status": "resolved",
                "labels": {**common, "alertname": "InventoryErrors", "deployment_id": "inv-1.2"},
                "annotations": {"summary": "inventory errors"},
                "startsAt": "2026-01-31T11:00:00.000Z",
                "endsAt": "2026-01-31T11:30:00.000Z",
                "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
                "fingerprint": "aa11bb22cc33dd44",
            },
        ],
    }


@pytest.fixture
def settings(kafka_bootstrap: str, sqlite_url: str) -> Settings:
    return Settings(
        broker=f"kafka://{kafka_bootstrap}",
        database_url=sqlite_url,
        topic_prefix=unique_name("hooks") + ".",
        api_token=TOKEN,
        signal_key=SIGNAL_KEY,
        web_host="0.0.0.0",
    )


@pytest.fixture
def controls() -> Controls:
    return Controls()


@pytest.fixture
async def runtime(settings: Settings, controls: Controls) -> AsyncIterator[ApiRuntime]:
    runtime = await ApiRuntime.open(settings, [driven_saga(controls)])
    try:
        yield runtime
    finally:
        controls.release(100)
        await runtime.close()


@pytest.fixture
async def client(runtime: ApiRuntime) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_web_app(runtime.settings, runtime))) as client:
        yield client


async def signals_on_topic(
    settings: Settings, bootstrap: str, count: int
) -> list[tuple[RollbackSignal, Any]]:
    """The signals published so far (exactly `count`), each checked for its signature."""
    records = await read_records(bootstrap, settings.signals_topic, count=count)
    assert len(records) == count
    found = []
    for record in records:
        header = dict(record.headers).get(SIGNATURE_HEADER)
        assert verify_signature(record.value, header, SIGNAL_KEY) is None
        found.append((RollbackSignal.model_validate_json(record.value), record))
    return found


# -------------------------------------------------------------------- Alertmanager


async def test_alertmanager_firing_alerts_become_signals_once(
    client: TestClient, runtime: ApiRuntime, settings: Settings, kafka_bootstrap: str
) -> None:
    await runtime.track("orders-2.4.0-7f3a", "Step", service="orders", version="2.4.0")
    await runtime.track("payments-3.1.0-a1", "Step", service="payments", version="3.1.0")
    payload = alertmanager_payload()

    response = await client.post("/api/alertmanager", json=payload, headers=AUTH)
    assert response.status == 202, await response.text()
    first = await response.json()
    assert len(first["rollback_ids"]) == 2
    assert all(uuid.UUID(i) for i in first["rollback_ids"])
    [ignored] = first["ignored"]
    assert ignored["alertname"] == "InventoryErrors"
    assert "resolved" in ignored["reason"]

    # Alertmanager repeats the notification (repeat_interval, or a retry).
    again = await client.post("/api/alertmanager", json=payload, headers=AUTH)
    assert again.status == 202
    assert (await again.json())["rollback_ids"] == first["rollback_ids"]

    published = await signals_on_topic(settings, kafka_bootstrap, 4)
    signals = [s for s, _ in published]
    assert [s.signal_id for s in signals] == first["rollback_ids"] * 2
    by_deployment, by_service = signals[0], signals[1]
    assert by_deployment.deployment_id == "orders-2.4.0-7f3a"
    assert by_deployment.requested_by == "alertmanager"
    assert by_deployment.reason == "OrdersErrorRate: 5xx rate above 5% on orders 2.4.0"
    assert (by_service.deployment_id, by_service.service, by_service.service_version) == (
        None,
        "payments",
        "3.1.0",
    )
    assert by_service.reason == "PaymentsLatency: p99 latency above 2s"
    assert published[0][1].key == b"orders-2.4.0-7f3a"
    assert published[1][1].key == b"payments"

    # Fed to a real engine, four signals are two rollbacks.
    for signal in signals:
        await runtime.engine.handle_signal(signal)
    rollbacks = await runtime.ledger.list_rollbacks()
    assert sorted(r.rollback_id for r in rollbacks) == sorted(first["rollback_ids"])
    deployments = {r.rollback_id: r.deployment_id for r in rollbacks}
    assert deployments[by_deployment.signal_id] == "orders-2.4.0-7f3a"
    assert deployments[by_service.signal_id] == "payments-3.1.0-a1"


async def test_alertmanager_a_refired_alert_is_a_new_rollback(client: TestClient) -> None:
    payload = alertmanager_payload()
    first = await (await client.post("/api/alertmanager", json=payload, headers=AUTH)).json()
    refired = copy.deepcopy(payload)
    refired["alerts"][0]["startsAt"] = "2026-02-01T08:00:00.000Z"
    second = await (await client.post("/api/alertmanager", json=refired, headers=AUTH)).json()
    assert second["rollback_ids"][0] != first["rollback_ids"][0]
    assert second["rollback_ids"][1] == first["rollback_ids"][1]


async def test_alertmanager_alerts_without_a_deployment_are_reported(
    client: TestClient, settings: Settings, kafka_bootstrap: str
) -> None:
    payload = alertmanager_payload()
    payload["alerts"] = [
        {
            "status": "firing",
            "labels": {"alertname": "DiskFull", "service": "payments"},
            "annotations": {},
            "startsAt": "2026-01-31T12:00:00Z",
            "fingerprint": "ffff",
        },
        payload["alerts"][0],
    ]
    response = await client.post("/api/alertmanager", json=payload, headers=AUTH)
    assert response.status == 202
    body = await response.json()
    assert len(body["rollback_ids"]) == 1
    [ignored] = body["ignored"]
    assert ignored["alertname"] == "DiskFull"
    assert "no deployment" in ignored["reason"]
    assert "'deployment_id'" in ignored["reason"]
    await signals_on_topic(settings, kafka_bootstrap, 1)


async def test_alertmanager_label_names_come_from_settings(
    kafka_bootstrap: str, sqlite_url: str
) -> None:
    settings = Settings(
        broker=f"kafka://{kafka_bootstrap}",
        database_url=sqlite_url,
        topic_prefix=unique_name("hooks") + ".",
        api_token=TOKEN,
        alert_deployment_label="rollout",
    )
    runtime = await ApiRuntime.open(settings)
    client = TestClient(TestServer(build_web_app(settings, runtime)))
    await client.start_server()
    try:
        payload = alertmanager_payload()
        payload["alerts"] = [payload["alerts"][0]]
        labels = payload["alerts"][0]["labels"]
        labels["rollout"] = labels.pop("deployment_id")
        response = await client.post("/api/alertmanager", json=payload, headers=AUTH)
        assert response.status == 202
        [signal] = (await response.json())["signals"]
        assert signal["deployment_id"] == "orders-2.4.0-7f3a"
    finally:
        await client.close()
        await runtime.close()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"version": "3", "alerts": []}, "unsupported Alertmanager webhook version"),
        ({"version": "4"}, "'alerts' list"),
        ({"version": "4", "alerts": ["x"]}, "alerts[0] is not an object"),
    ],
)
async def test_alertmanager_rejects_a_bad_payload(
    client: TestClient, payload: dict[str, Any], expected: str
) -> None:
    response = await client.post("/api/alertmanager", json=payload, headers=AUTH)
    assert response.status == 400
    assert expected in (await response.json())["error"]


# ------------------------------------------------------------------------ Flagger


def flagger_event(phase: str = "Failed", **metadata: str) -> dict[str, Any]:
    """A Flagger event webhook payload (Flagger 1.x `CanaryWebhookPayload`)."""
    return {
        "name": "podinfo",
        "namespace": "test",
        "phase": phase,
        "checksum": "5d9c4f7b8",
        "buildId": "",
        "type": "event",
        "failedChecks": 5,
        "canaryWeight": 0,
        "iterations": 0,
        "remainingTime": 0,
        "metadata": {
            "eventMessage": "Canary failed! Scaling down podinfo.test",
            "eventType": "Warning",
            "timestamp": "1769860800000",
            **metadata,
        },
    }


async def test_flagger_failed_canary_becomes_one_signal(
    client: TestClient, settings: Settings, kafka_bootstrap: str
) -> None:
    event = flagger_event(version="6.1.0")
    response = await client.post("/api/flagger", json=event, headers=AUTH)
    assert response.status == 202, await response.text()
    [rollback_id] = (await response.json())["rollback_ids"]
    # Flagger sends several events for one failure: the same rollback.
    later = flagger_event(version="6.1.0", timestamp="1769860860000")
    later["metadata"]["eventMessage"] = (
        "Rolling back podinfo.test failed checks threshold reached 5"
    )
    again = await client.post("/api/flagger", json=later, headers=AUTH)
    assert (await again.json())["rollback_ids"] == [rollback_id]

    [(signal, record), (repeat, _)] = await signals_on_topic(settings, kafka_bootstrap, 2)
    assert signal.signal_id == repeat.signal_id == rollback_id
    assert signal.deployment_id == "podinfo-6.1.0"
    assert signal.requested_by == "flagger"
    assert (
        signal.reason
        == "Flagger canary test/podinfo failed: Canary failed! Scaling down podinfo.test"
    )
    assert record.key == b"podinfo-6.1.0"


@pytest.mark.parametrize(
    ("metadata", "deployment"),
    [
        ({"deployment_id": "podinfo-6.1.0-abc12", "version": "6.1.0"}, "podinfo-6.1.0-abc12"),
        ({"revision": "42"}, "podinfo-42"),
    ],
)
async def test_flagger_deployment_mapping(
    client: TestClient, metadata: dict[str, str], deployment: str
) -> None:
    response = await client.post("/api/flagger", json=flagger_event(**metadata), headers=AUTH)
    assert response.status == 202
    [signal] = (await response.json())["signals"]
    assert signal["deployment_id"] == deployment


async def test_flagger_other_phases_are_ignored(
    client: TestClient, settings: Settings, kafka_bootstrap: str
) -> None:
    for phase in ("Progressing", "Succeeded", "Promoting"):
        response = await client.post(
            "/api/flagger", json=flagger_event(phase, version="6.1.0"), headers=AUTH
        )
        assert response.status == 202
        body = await response.json()
        assert body["rollback_ids"] == []
        assert phase in body["ignored"][0]["reason"]
    # Nothing published: the one record below is the failed canary's.
    await client.post("/api/flagger", json=flagger_event(version="6.1.0"), headers=AUTH)
    await signals_on_topic(settings, kafka_bootstrap, 1)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (flagger_event(), "names no deployment"),
        ({"namespace": "test", "phase": "Failed"}, "'name' and 'phase'"),
    ],
)
async def test_flagger_rejects_a_payload_without_a_deployment(
    client: TestClient, payload: dict[str, Any], expected: str
) -> None:
    response = await client.post("/api/flagger", json=payload, headers=AUTH)
    assert response.status == 400
    assert expected in (await response.json())["error"]


# ------------------------------------------------------------------ Argo Rollouts


def argo_notification(event: str = "rollout-aborted", **fields: str) -> dict[str, Any]:
    """The body the documented `backout-rollout-aborted` template renders."""
    return {
        "event": event,
        "rollout": "checkout",
        "namespace": "shop",
        "revision": "7",
        "pod_hash": "6d4f9c8b7",
        # A missing annotation renders as Go's "<no value>".
        "deployment_id": "<no value>",
        **fields,
    }


async def test_argo_aborted_rollout_becomes_one_signal(
    client: TestClient, settings: Settings, kafka_bootstrap: str
) -> None:
    response = await client.post("/api/argo-rollouts", json=argo_notification(), headers=AUTH)
    assert response.status == 202, await response.text()
    [rollback_id] = (await response.json())["rollback_ids"]
    again = await client.post("/api/argo-rollouts", json=argo_notification(), headers=AUTH)
    assert (await again.json())["rollback_ids"] == [rollback_id]

    [(signal, record), _] = await signals_on_topic(settings, kafka_bootstrap, 2)
    assert signal.signal_id == rollback_id
    assert signal.deployment_id == "checkout-6d4f9c8b7"
    assert signal.requested_by == "argo-rollouts"
    assert signal.reason == "Argo rollout shop/checkout aborted"
    assert record.key == b"checkout-6d4f9c8b7"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"deployment_id": "checkout-2.0.1-x"}, {"deployment_id": "checkout-2.0.1-x"}),
        (
            {"service": "checkout", "version": "2.0.1"},
            {"deployment_id": None, "service": "checkout", "service_version": "2.0.1"},
        ),
    ],
)
async def test_argo_deployment_mapping(
    client: TestClient, fields: dict[str, str], expected: dict[str, Any]
) -> None:
    response = await client.post(
        "/api/argo-rollouts", json=argo_notification(**fields), headers=AUTH
    )
    assert response.status == 202
    [signal] = (await response.json())["signals"]
    assert {k: signal[k] for k in expected} == expected


async def test_argo_other_events_are_ignored(client: TestClient) -> None:
    response = await client.post(
        "/api/argo-rollouts", json=argo_notification("rollout-completed"), headers=AUTH
    )
    assert response.status == 202
    body = await response.json()
    assert body["rollback_ids"] == []
    assert "rollout-completed" in body["ignored"][0]["reason"]


async def test_argo_rejects_a_payload_without_a_deployment(client: TestClient) -> None:
    payload = argo_notification(pod_hash="<no value>")
    response = await client.post("/api/argo-rollouts", json=payload, headers=AUTH)
    assert response.status == 400
    assert "names no deployment" in (await response.json())["error"]


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/api/alertmanager", alertmanager_payload()),
        ("/api/flagger", flagger_event(version="1")),
        ("/api/argo-rollouts", argo_notification()),
    ],
)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}])
async def test_webhooks_need_the_token(
    client: TestClient,
    runtime: ApiRuntime,
    path: str,
    payload: dict[str, Any],
    headers: dict[str, str],
) -> None:
    response = await client.post(path, json=payload, headers=headers)
    assert response.status == 401
    assert "token" in (await response.json())["error"]
    assert await runtime.ledger.list_rollbacks() == []


async def test_webhook_signals_start_rollbacks_in_a_real_engine(
    client: TestClient,
    runtime: ApiRuntime,
    settings: Settings,
    kafka_bootstrap: str,
    controls: Controls,
) -> None:
    await runtime.track("checkout-6d4f9c8b7", "Step", "Step")
    await client.post("/api/argo-rollouts", json=argo_notification(), headers=AUTH)
    [(signal, _)] = await signals_on_topic(settings, kafka_bootstrap, 1)
    await runtime.engine.handle_signal(signal)
    controls.release(2)
    await wait_for(
        lambda: _state(runtime, signal.signal_id, "completed"), message="rollback completed"
    )


async def _state(runtime: ApiRuntime, rollback_id: str, state: str) -> bool:
    return bool((await runtime.ledger.require_rollback(rollback_id)).state == state)
