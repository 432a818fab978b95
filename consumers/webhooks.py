"""Webhooks that turn alerts and failed rollouts into rollback signals.

- `POST /api/alertmanager`: Prometheus Alertmanager (webhook payload version "4").
- `POST /api/flagger`: Flagger canary webhooks (event or post-rollout hooks).
- `POST /api/argo-rollouts`: Argo Rollouts notifications, with the JSON body
  documented in docs/operations/alerting.md.

Senders repeat themselves (Alertmanager re-notifies every `repeat_interval`,
Flagger sends several events for one failure, notification controllers
retry). Every signal id is therefore derived from what identifies the
incident, never from the time of the request: the engine treats a signal id
it has seen as the same rollback, so a repeat never starts a second one.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from consumers.webcore import (
    ApiError,
    json_response,
    publish,
    read_json_object,
    require_write_access,
    settings_of,
)
from schemas._base import utc_now
from schemas.errors import describe_validation_error
from schemas.signal import RollbackSignal

log = logging.getLogger(__name__)

# Fixed forever: signal ids derived from it must be the same in every release.
WEBHOOK_NAMESPACE = uuid.UUID("3d5a0f7e-9b1c-5e44-8a27-6c0ffee0b4c7")
ALERTMANAGER_VERSION = "4"
FLAGGER_FAILED = "failed"
ARGO_ABORTED = "rollout-aborted"
MAX_REASON = 4000
# What a Go template prints for a missing map key (Argo notifications).
GO_NO_VALUE = "<no value>"


def derived_id(source: str, *parts: str) -> str:
    """The deterministic signal id of an incident reported by `source`."""
    return str(uuid.uuid5(WEBHOOK_NAMESPACE, "\x1f".join((source, *parts))))


def _text(value: Any) -> str | None:
    """A non-empty string, else None (Go templates print `<no value>` for missing keys)."""
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text if text and text != GO_NO_VALUE else None


def _signal(fields: dict[str, Any]) -> RollbackSignal:
    fields = {k: v for k, v in fields.items() if v is not None}
    fields.setdefault("issued_at", utc_now().isoformat())
    if isinstance(fields.get("reason"), str):
        fields["reason"] = fields["reason"][:MAX_REASON]
    try:
        return RollbackSignal.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(400, describe_validation_error("RollbackSignal", exc)) from None


def _accepted(signals: list[RollbackSignal], ignored: list[dict[str, Any]]) -> web.Response:
    return json_response(
        {
            "rollback_ids": [s.signal_id for s in signals],
            "signals": [
                {
                    "rollback_id": s.signal_id,
                    "deployment_id": s.deployment_id,
                    "service": s.service,
                    "service_version": s.service_version,
                }
                for s in signals
            ],
            "ignored": ignored,
        },
        status=202,
    )


async def _publish_all(request: web.Request, signals: list[RollbackSignal]) -> None:
    for signal in signals:
        await publish(request, signal)
        log.info(
            "webhook %s: rollback %s of %s",
            request.path,
            signal.signal_id,
            signal.deployment_id or f"{signal.service} {signal.service_version}",
        )


# ------------------------------------------------------------------- Alertmanager


def _alert_signal(alert: dict[str, Any], settings: Any) -> RollbackSignal | str:
    """The signal of one firing alert, or why it has none."""
    labels = alert.get("labels") if isinstance(alert.get("labels"), dict) else {}
    annotations = alert.get("annotations") if isinstance(alert.get("annotations"), dict) else {}
    deployment = _text(labels.get(settings.alert_deployment_label))
    service = _text(labels.get(settings.alert_service_label))
    version = _text(labels.get(settings.alert_version_label))
    if deployment is None and (service is None or version is None):
        return (
            f"no deployment: the alert has no {settings.alert_deployment_label!r} label "
            f"and not both {settings.alert_service_label!r} and {settings.alert_version_label!r}"
        )
    # Alertmanager's fingerprint hashes the label set; without one, do the same.
    fingerprint = _text(alert.get("fingerprint")) or json.dumps(labels, sort_keys=True)
    starts_at = _text(alert.get("startsAt")) or ""
    name = _text(labels.get("alertname")) or "alert"
    text = _text(annotations.get("summary")) or _text(annotations.get("description"))
    return _signal(
        {
            "signal_id": derived_id("alertmanager", fingerprint, starts_at),
            "deployment_id": deployment,
            "service": None if deployment else service,
            "service_version": None if deployment else version,
            "reason": f"{name}: {text}" if text else name,
            "requested_by": "alertmanager",
        }
    )


async def alertmanager(request: web.Request) -> web.Response:
    """One signal per firing alert that names a deployment; resolved alerts are ignored.

    The signal id is derived from the alert's fingerprint and `startsAt`, so
    Alertmanager's repeated notifications of one alert are one rollback.
    """
    require_write_access(request)
    body = await read_json_object(request)
    version = body.get("version")
    if str(version) != ALERTMANAGER_VERSION:
        raise ApiError(
            400,
            f"unsupported Alertmanager webhook version {version!r}: expected "
            f"{ALERTMANAGER_VERSION!r}",
        )
    alerts = body.get("alerts")
    if not isinstance(alerts, list):
        raise ApiError(400, "the Alertmanager payload has no 'alerts' list")
    settings = settings_of(request)
    signals: list[RollbackSignal] = []
    ignored: list[dict[str, Any]] = []
    for index, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise ApiError(400, f"alerts[{index}] is not an object")
        labels = alert.get("labels") if isinstance(alert.get("labels"), dict) else {}
        about = {
            "index": index,
            "alertname": labels.get("alertname"),
            "fingerprint": alert.get("fingerprint"),
        }
        if alert.get("status") != "firing":
            ignored.append({**about, "reason": f"status is {alert.get('status')!r}, not firing"})
            continue
        outcome = _alert_signal(alert, settings)
        if isinstance(outcome, str):
            ignored.append({**about, "reason": outcome})
        elif all(s.signal_id != outcome.signal_id for s in signals):
            signals.append(outcome)
    await _publish_all(request, signals)
    return _accepted(signals, ignored)


# ------------------------------------------------------------------------ Flagger


async def flagger(request: web.Request) -> web.Response:
    """A failed canary (phase "Failed") → a signal for the canary's deployment.

    Deployment: `metadata.deployment_id`, else `<name>-<metadata.version>`,
    else `<name>-<metadata.revision>`. The id is derived from the namespace,
    name, deployment and Flagger's checksum, so the several events of one
    failure are one rollback.
    """
    require_write_access(request)
    body = await read_json_object(request)
    name, namespace = _text(body.get("name")), _text(body.get("namespace")) or ""
    phase = _text(body.get("phase"))
    if name is None or phase is None:
        raise ApiError(400, "a Flagger payload needs 'name' and 'phase'")
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    if phase.lower() != FLAGGER_FAILED:
        return _accepted([], [{"canary": f"{namespace}/{name}", "reason": f"phase is {phase}"}])
    deployment = _text(metadata.get("deployment_id"))
    if deployment is None:
        version = _text(metadata.get("version")) or _text(metadata.get("revision"))
        if version is None:
            raise ApiError(
                400,
                f"canary {namespace}/{name} failed but the payload names no deployment: add "
                "metadata 'deployment_id' (or 'version') to the Flagger webhook",
            )
        deployment = f"{name}-{version}"
    message = _text(metadata.get("eventMessage"))
    signal = _signal(
        {
            "signal_id": derived_id(
                "flagger", namespace, name, deployment, _text(body.get("checksum")) or ""
            ),
            "deployment_id": deployment,
            "reason": f"Flagger canary {namespace}/{name} failed"
            + (f": {message}" if message else ""),
            "requested_by": "flagger",
        }
    )
    await _publish_all(request, [signal])
    return _accepted([signal], [])


# ------------------------------------------------------------------ Argo Rollouts


async def argo_rollouts(request: web.Request) -> web.Response:
    """An aborted rollout → a signal (body: see docs/operations/alerting.md).

    Deployment: `deployment_id`, else `service` + `version`, else
    `<rollout>-<pod_hash>`. The id is derived from the namespace, rollout and
    deployment, so repeated notifications are one rollback.
    """
    require_write_access(request)
    body = await read_json_object(request)
    event = _text(body.get("event"))
    rollout, namespace = _text(body.get("rollout")), _text(body.get("namespace")) or ""
    if event is None or rollout is None:
        raise ApiError(400, "an Argo Rollouts payload needs 'event' and 'rollout'")
    if event != ARGO_ABORTED:
        return _accepted(
            [], [{"rollout": f"{namespace}/{rollout}", "reason": f"event is {event!r}"}]
        )
    deployment = _text(body.get("deployment_id"))
    service, version = _text(body.get("service")), _text(body.get("version"))
    if deployment is None and (service is None or version is None):
        pod_hash = _text(body.get("pod_hash"))
        if pod_hash is None:
            raise ApiError(
                400,
                f"rollout {namespace}/{rollout} was aborted but the payload names no "
                "deployment: send 'deployment_id', 'service' and 'version', or 'pod_hash'",
            )
        deployment = f"{rollout}-{pod_hash}"
    named = deployment or f"{service}\x1f{version}"
    message = _text(body.get("message"))
    signal = _signal(
        {
            "signal_id": derived_id("argo-rollouts", namespace, rollout, named),
            "deployment_id": deployment,
            "service": None if deployment else service,
            "service_version": None if deployment else version,
            "reason": f"Argo rollout {namespace}/{rollout} aborted"
            + (f": {message}" if message else ""),
            "requested_by": "argo-rollouts",
        }
    )
    await _publish_all(request, [signal])
    return _accepted([signal], [])


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the webhook endpoints."""
    router.add_post("/api/alertmanager", alertmanager)
    router.add_post("/api/flagger", flagger)
    router.add_post("/api/argo-rollouts", argo_rollouts)
