"""Bodies of the CLI commands that talk to Kafka (kept out of cli.py's import path)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from consumers.client import follow_status, publish_signal, read_statuses
from consumers.settings import Settings
from schemas import (
    RollbackSignal,
    RollbackState,
    RollbackStatus,
    describe_validation_error,
    utc_now,
)

# Piped output (CI logs, `| less`) gets a wide console instead of rich's 80
# columns, so ids and errors stay readable.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 2


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit code 1."""


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CommandError(f"{option}: not an RFC 3339 time: {text!r}") from exc
    if value.tzinfo is None:
        raise CommandError(f"{option}: give a UTC offset, e.g. 2026-01-31T12:00:00Z")
    return value


def build_signal(**fields: Any) -> RollbackSignal:
    """Validate signal fields; a clear `CommandError` when they are wrong."""
    try:
        return RollbackSignal.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise CommandError(describe_validation_error("rollback signal", exc)) from exc


def rollback_command(
    *,
    deployment: str | None,
    service: str | None,
    version: str | None,
    since: str | None,
    until: str | None,
    cascade: bool,
    dry_run: bool,
    reason: str | None,
    force: bool,
    wait: bool,
    timeout: float,
    signal_id: str | None,
) -> int:
    """Publish a signal, optionally follow it; returns the exit code."""
    settings = Settings()
    signal = build_signal(
        signal_id=signal_id or str(uuid.uuid4()),
        deployment_id=deployment,
        service=service,
        service_version=version,
        since=_time(since, "--since"),
        until=_time(until, "--until"),
        cascade=cascade,
        dry_run=dry_run,
        reason=reason,
        requested_by="cli",
        force=force,
        issued_at=utc_now(),
    )
    from consumers.observability import configure_tracing

    # The signal carries the context of a `send backout.rollbacks` span, so a
    # traced CLI call is the root of the rollback's trace.
    provider = configure_tracing(settings)
    try:
        asyncio.run(publish_signal(settings, signal))
    finally:
        if provider is not None:
            provider.shutdown()
    console.print(signal.signal_id)
    if not wait:
        return EXIT_OK
    final = asyncio.run(_follow_with_progress(settings, signal.signal_id, timeout))
    if final is None:
        errors.print(f"[yellow]no final status for {signal.signal_id} within {timeout:g}s[/]")
        return EXIT_TIMEOUT
    _print_status_table([final])
    if final.state in (RollbackState.FAILED, RollbackState.REJECTED):
        errors.print(f"[red]rollback {final.state}: {final.error}[/]")
        return EXIT_FAILED
    if final.state == RollbackState.COMPLETED_WITH_WARNINGS:
        errors.print(
            f"[yellow]completed with warnings: {final.manual} manual action(s), "
            f"{final.uncovered} uncovered event(s) — see `backout plan` / the status page[/]"
        )
    return EXIT_OK


async def _follow_with_progress(
    settings: Settings, rollback_id: str, timeout: float
) -> RollbackStatus | None:
    with Progress(
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} applied · {task.fields[confirmed]} confirmed"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("rollback", total=None, state="waiting", confirmed=0)

        def show(status: RollbackStatus) -> None:
            progress.update(
                task,
                total=max(status.planned, 1),
                completed=status.applied,
                state=status.state.value,
                confirmed=status.confirmed,
            )

        return await follow_status(settings, rollback_id, timeout=timeout, on_status=show)


def status_command(rollback_id: str | None, output: str) -> int:
    """Print the latest status of one or all rollbacks."""
    if output not in ("table", "json"):
        raise CommandError("--format must be table or json")
    statuses = asyncio.run(read_statuses(Settings()))
    if rollback_id is not None:
        if rollback_id not in statuses:
            raise CommandError(f"unknown rollback {rollback_id!r}: no status record on the topic")
        selected = [statuses[rollback_id]]
    else:
        selected = sorted(statuses.values(), key=lambda s: s.updated_at, reverse=True)
    if output == "json":
        payload = [s.model_dump(mode="json") for s in selected]
        console.print_json(json.dumps(payload[0] if rollback_id else payload))
    else:
        _print_status_table(selected)
    return EXIT_OK


def _print_status_table(statuses: list[RollbackStatus]) -> None:
    table = Table(title="Rollbacks", expand=False)
    table.add_column("rollback", overflow="fold")
    table.add_column("deployment", overflow="fold")
    table.add_column("state")
    table.add_column("applied/planned", justify="right")
    table.add_column("confirmed", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("skipped", justify="right")
    table.add_column("manual", justify="right")
    table.add_column("uncovered", justify="right")
    table.add_column("late", justify="right")
    for s in statuses:
        table.add_row(
            s.rollback_id,
            s.deployment_id or "",
            s.state.value,
            f"{s.applied}/{s.planned}",
            str(s.confirmed),
            str(s.failed),
            str(s.skipped),
            str(s.manual),
            str(s.uncovered),
            str(s.late),
        )
    console.print(table)
    for s in statuses:
        if s.error:
            console.print(f"[bold]{s.rollback_id}[/]: {s.error}", soft_wrap=True)


def plan_command(
    *,
    deployment: str | None,
    service: str | None,
    version: str | None,
    since: str | None,
    until: str | None,
    cascade: bool,
    output: str,
) -> int:
    """Print a dry-run plan computed from the ledger."""
    from consumers.operations import plan_signal
    from consumers.plan_report import plan_as_json, plan_as_markdown, print_plan_table

    if output not in ("table", "json", "markdown"):
        raise CommandError("--format must be table, json or markdown")
    signal = build_signal(
        signal_id=f"plan-{uuid.uuid4()}",
        deployment_id=deployment,
        service=service,
        service_version=version,
        since=_time(since, "--since"),
        until=_time(until, "--until"),
        cascade=cascade,
        dry_run=True,
        issued_at=utc_now(),
    )
    report = asyncio.run(plan_signal(Settings(), signal))
    if output == "json":
        print(plan_as_json(report))
    elif output == "markdown":
        print(plan_as_markdown(report))
    else:
        print_plan_table(report, console)
    return EXIT_OK


def deployments_command(output: str) -> int:
    """Print tracked deployments."""
    from dataclasses import asdict

    from consumers.operations import deployments

    if output not in ("table", "json"):
        raise CommandError("--format must be table or json")
    found = asyncio.run(deployments(Settings()))
    if output == "json":
        print(json.dumps([asdict(d) for d in found], default=str, indent=2))
        return EXIT_OK
    table = Table(title="Deployments")
    for column in (
        "deployment",
        "service",
        "version",
        "events",
        "first event",
        "last event",
        "by type",
    ):
        table.add_column(column, overflow="fold")
    for d in found:
        table.add_row(
            d.deployment_id,
            d.service,
            d.service_version,
            str(d.events),
            d.first_event_at.isoformat(),
            d.last_event_at.isoformat(),
            ", ".join(f"{name}: {count}" for name, count in d.by_type.items()),
        )
    console.print(table)
    return EXIT_OK


def retry_command(key: str) -> int:
    """Retry a failed compensation."""
    from consumers.operations import retry

    reopened = asyncio.run(retry(Settings(), key))
    console.print(f"compensation {key} will run again; rollbacks resumed: {reopened or 'none'}")
    return EXIT_OK


def skip_command(key: str, reason: str) -> int:
    """Skip a compensation."""
    from consumers.operations import skip

    reopened = asyncio.run(skip(Settings(), key, reason))
    console.print(f"compensation {key} skipped; rollbacks resumed: {reopened or 'none'}")
    return EXIT_OK


def pause_command(rollback_id: str) -> int:
    """Pause a rollback."""
    from consumers.operations import pause

    asyncio.run(pause(Settings(), rollback_id))
    console.print(f"rollback {rollback_id} paused")
    return EXIT_OK


def resume_command(rollback_id: str) -> int:
    """Resume a rollback."""
    from consumers.operations import resume

    asyncio.run(resume(Settings(), rollback_id))
    console.print(f"rollback {rollback_id} resumed")
    return EXIT_OK


def dlq_list_command(source_topic: str | None, match: str | None, output: str) -> int:
    """List dead letters."""
    from consumers.dlq import list_dead_letters

    if output not in ("table", "json"):
        raise CommandError("--format must be table or json")
    letters = asyncio.run(list_dead_letters(Settings(), source_topic=source_topic, match=match))
    if output == "json":
        print(
            json.dumps(
                [
                    {
                        "dlq_partition": d.partition,
                        "dlq_offset": d.offset,
                        **d.letter.model_dump(),
                        "key": d.key.decode("utf-8", "replace") if d.key else None,
                        "value_preview": (d.value or b"")[:200].decode("utf-8", "replace"),
                    }
                    for d in letters
                ],
                indent=2,
            )
        )
        return EXIT_OK
    table = Table(title=f"Dead letters ({len(letters)})")
    for column in ("source", "error", "value"):
        table.add_column(column, overflow="fold")
    for d in letters:
        table.add_row(
            f"{d.letter.source_topic}[{d.letter.source_partition}]@{d.letter.source_offset}",
            d.letter.error,
            (d.value or b"")[:80].decode("utf-8", "replace"),
        )
    console.print(table)
    return EXIT_OK


def dlq_replay_command(source_topic: str | None, match: str | None, dry_run: bool) -> int:
    """Replay dead letters to their source topics."""
    from consumers.dlq import list_dead_letters, replay

    settings = Settings()
    letters = asyncio.run(list_dead_letters(settings, source_topic=source_topic, match=match))
    if dry_run:
        for d in letters:
            console.print(
                f"would replay {d.letter.source_topic}@{d.letter.source_offset}: {d.letter.error}"
            )
        console.print(f"{len(letters)} dead letter(s) would be replayed")
        return EXIT_OK
    sent = asyncio.run(replay(settings, letters))
    console.print(f"replayed {sent} dead letter(s)")
    return EXIT_OK


def retire_command(deployment_id: str) -> int:
    """End the late-event quarantine of a deployment."""
    from consumers.operations import retire

    closed = asyncio.run(retire(Settings(), deployment_id))
    console.print(
        f"deployment {deployment_id} retired; late events no longer compensated "
        f"(quarantine closed for: {', '.join(closed) or 'no rollback'})"
    )
    return EXIT_OK
