"""Rendering a dry-run plan: a rich table, JSON, or a Markdown operator runbook."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from consumers.operations import PlanReport


def plan_as_dict(report: PlanReport) -> dict[str, Any]:
    """The plan as JSON-ready data (what `backout plan --format json` prints)."""
    plan = report.plan
    return {
        "deployment_id": report.radius.deployment_id,
        "events": plan.events,
        "compensations": len(plan.items),
        "guard": report.guard,
        "over_guard": len(plan.items) > report.guard,
        "cascade": report.signal.cascade,
        "since": report.signal.since.isoformat() if report.signal.since else None,
        "until": (report.signal.until or report.signal.issued_at).isoformat(),
        "steps": [
            {
                "position": item.position + 1,
                "idempotency_key": item.key,
                "event_id": item.event.event_id,
                "event_type": item.event.event_type,
                "schema_version": item.event.schema_version,
                "service": item.event.service,
                "deployment_id": item.event.deployment_id,
                "correlation_id": item.event.correlation_id,
                "saga": item.step.saga,
                "step": item.step.name,
                "confirm": item.step.confirm,
                "after": list(item.depends_on),
            }
            for item in plan.items
        ],
        "manual_actions": [note.as_dict() for note in plan.manual],
        "uncovered_events": [note.as_dict() for note in plan.uncovered],
        "ignored_events": plan.ignored,
    }


def plan_as_json(report: PlanReport) -> str:
    """`--format json`."""
    return json.dumps(plan_as_dict(report), indent=2)


def print_plan_table(report: PlanReport, console: Console) -> None:
    """`--format table`: the steps in order, then manual actions and uncovered events."""
    data = plan_as_dict(report)
    console.print(
        f"[bold]Plan for {data['deployment_id']}[/]: {data['events']} events, "
        f"{data['compensations']} compensations (guard {data['guard']})"
    )
    table = Table(title="Compensations, in order")
    for column in ("#", "event type", "service", "instance", "step", "confirm", "waits for"):
        table.add_column(column, overflow="fold")
    for step in data["steps"]:
        table.add_row(
            str(step["position"]),
            f"{step['event_type']} v{step['schema_version']}",
            step["service"],
            step["correlation_id"] or "",
            step["step"],
            step["confirm"] or "",
            str(len(step["after"])),
        )
    console.print(table)
    if data["manual_actions"]:
        manual = Table(title="Manual actions (irreversible)")
        for column in ("event type", "event id", "service", "instruction"):
            manual.add_column(column, overflow="fold")
        for note in data["manual_actions"]:
            manual.add_row(note["event_type"], note["event_id"], note["service"], note["detail"])
        console.print(manual)
    if data["uncovered_events"]:
        uncovered = Table(title="Uncovered events (no compensation known)")
        for column in ("event type", "event id", "reason"):
            uncovered.add_column(column, overflow="fold")
        for note in data["uncovered_events"]:
            uncovered.add_row(
                f"{note['event_type']} v{note['schema_version']}", note["event_id"], note["detail"]
            )
        console.print(uncovered)
    if data["over_guard"]:
        console.print(
            "[yellow]Over the guard: the rollback will be rejected unless sent with --force.[/]"
        )


def plan_as_markdown(report: PlanReport) -> str:
    """`--format markdown`: an operator runbook for this rollback."""
    data = plan_as_dict(report)
    lines = [
        f"# Rollback runbook: {data['deployment_id']}",
        "",
        f"- Window: {data['since'] or 'first event'} → {data['until']}",
        f"- Cascade to caused events: {'yes' if data['cascade'] else 'no'}",
        f"- Events in the blast radius: {data['events']} "
        f"({data['ignored_events']} need nothing undone)",
        f"- Automatic compensations: {data['compensations']} (guard: {data['guard']}"
        f"{', OVER THE GUARD: send with --force' if data['over_guard'] else ''})",
        f"- Manual actions: {len(data['manual_actions'])}",
        f"- Uncovered events: {len(data['uncovered_events'])}",
        "",
        "## 1. Start the rollback",
        "",
        "```",
        f"backout rollback --deployment {data['deployment_id']} --reason '...' --wait",
        "```",
        "",
        "## 2. What will be undone, in order",
        "",
        "Children are undone before the events that caused them; within one saga "
        "instance, the latest step first.",
        "",
        "| # | event | service | instance | compensation | confirmed by |",
        "|---|---|---|---|---|---|",
    ]
    for step in data["steps"]:
        lines.append(
            f"| {step['position']} | {step['event_type']} v{step['schema_version']} "
            f"(`{step['event_id']}`) | {step['service']} | {step['correlation_id'] or ''} | "
            f"{step['step']} | {step['confirm'] or '—'} |"
        )
    lines += _checklist(
        "## 3. Manual actions",
        [
            f"- [ ] **{note['event_type']}** `{note['event_id']}` ({note['service']}): "
            f"{note['detail']}"
            for note in data["manual_actions"]
        ],
    )
    lines += _checklist(
        "## 4. Uncovered events",
        [
            f"- [ ] **{note['event_type']} v{note['schema_version']}** `{note['event_id']}`: "
            f"{note['detail']} — decide by hand, or add a compensation and roll back again."
            for note in data["uncovered_events"]
        ],
    )
    lines += [
        "",
        "## 5. Verify",
        "",
        "```",
        "backout status <rollback-id>          # completed, or completed_with_warnings",
        "```",
        "",
        "- Every compensation is `confirmed` (or `applied` for steps without a confirmation).",
        "- Failed compensations: `backout retry <key>` after fixing the cause, or "
        "`backout skip <key> --reason '...'`.",
        "- Tick every manual action above, and check the services' own dashboards.",
        "",
    ]
    return "\n".join(lines)


def _checklist(heading: str, items: list[str]) -> list[str]:
    """A runbook section of to-do items; "None." says the empty list was not forgotten."""
    return ["", heading, "", *(items or ["None."])]
