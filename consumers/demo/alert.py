"""Raising the demo's alert the way production does: Alertmanager's webhook.

The worker turns a firing alert labelled `backout="rollback"` with a
`deployment_id` into a rollback signal (`requested_by: alertmanager`); the
demo posts exactly what Alertmanager would (webhook payload version 4),
without a token: the worker listens on loopback only, where writes are open.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from consumers.demo.processes import DemoError
from examples.shop.flow import Deployment
from schemas import utc_now

ALERT_NAME = "DeploymentHighErrorRate"
WEBHOOK_PATH = "/api/alertmanager"


@dataclass(frozen=True, slots=True)
class Alert:
    """How the rollback was requested, and its id."""

    rollback_id: str
    path: str  # what carried it
    raised_at: float  # time.monotonic() when it was sent


def alertmanager_payload(deployment: Deployment, *, error_rate: float) -> dict[str, Any]:
    """An Alertmanager webhook body (version 4) with one firing alert for `deployment`."""
    now = utc_now().isoformat().replace("+00:00", "Z")
    labels = {
        "alertname": ALERT_NAME,
        "backout": "rollback",
        "deployment_id": deployment.deployment_id,
        "service": deployment.service,
        "version": deployment.service_version,
        "severity": "critical",
    }
    summary = (
        f"{deployment.service} {deployment.service_version} answers "
        f"{error_rate:.0%} of checkouts with 5xx"
    )
    return {
        "version": "4",
        "groupKey": f'{{}}/{{backout="rollback"}}:{{deployment_id="{deployment.deployment_id}"}}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "backout",
        "groupLabels": {"deployment_id": deployment.deployment_id},
        "commonLabels": labels,
        "commonAnnotations": {"summary": summary},
        "externalURL": "http://alertmanager.demo:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": summary},
                "startsAt": now,
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.demo:9090/graph",
                "fingerprint": uuid.uuid4().hex[:16],
            }
        ],
    }


async def raise_alert(
    http: aiohttp.ClientSession,
    base_url: str,
    deployment: Deployment,
    *,
    error_rate: float,
) -> Alert:
    """Fire the alert for `deployment`; return the rollback it started."""
    url = f"{base_url}{WEBHOOK_PATH}"
    raised_at = time.monotonic()
    async with http.post(url, json=alertmanager_payload(deployment, error_rate=error_rate)) as r:
        status = r.status
        body = await r.json(content_type=None)
    ids = body.get("rollback_ids") if status == 202 and isinstance(body, dict) else None
    if not ids:
        raise DemoError(f"POST {WEBHOOK_PATH} answered {status} without a rollback: {body!r}")
    return Alert(str(ids[0]), f"Alertmanager webhook POST {url}", raised_at)
