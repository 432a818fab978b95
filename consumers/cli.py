"""The ``backout`` command line.

Each command imports what it needs inside its body, so ``backout --help`` and
commands that do not touch Kafka or the database stay fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="backout",
    help="Backout: undo the data a bad deployment wrote across services.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)

# Options several commands take, declared once so that they read the same in each --help.
ServiceOption = Annotated[str | None, typer.Option(help="Service name (with --version).")]
VersionOption = Annotated[str | None, typer.Option(help="Service version (with --service).")]
SinceOption = Annotated[str | None, typer.Option(help="Only events at or after (RFC 3339).")]
UntilOption = Annotated[str | None, typer.Option(help="Only events at or before (RFC 3339).")]
TableOrJsonOption = Annotated[str, typer.Option("--format", help="table or json.")]
RollbackIdArgument = Annotated[str, typer.Argument(help="The rollback id.")]
SourceTopicOption = Annotated[str | None, typer.Option(help="Only from this topic.")]
MatchOption = Annotated[str | None, typer.Option(help="Only errors containing this text.")]


@app.callback()
def _root() -> None:
    """Backout: undo the data a bad deployment wrote across services."""
    # An explicit callback keeps `backout` a command group even while it has a
    # single command; otherwise Typer would run that command as the root.


@app.command(
    epilog=(
        "Example:\n\n"
        "  backout broker --port 9092\n\n"
        "  BACKOUT_BROKER=kafka://127.0.0.1:9092 backout worker"
    ),
)
def broker(
    host: Annotated[
        str, typer.Option(help="Address to listen on and to advertise to clients.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 9092,
) -> None:
    """Run the embedded development broker (Tansu, Kafka-compatible) until Ctrl-C.

    Storage is in memory: topics, offsets and consumer groups are lost when it
    stops. Production uses Apache Kafka (see docker-compose.yml).
    """
    from consumers.broker import run_foreground

    raise typer.Exit(run_foreground(host, port))


@app.command(
    epilog=(
        "Example:\n\n"
        "  BACKOUT_BROKER=kafka://127.0.0.1:9092 BACKOUT_SAGAS=examples.shop.saga backout worker"
    ),
)
def worker(
    loglevel: Annotated[
        str | None,
        typer.Option(help="Log level: debug, info, warning (default: BACKOUT_LOG_LEVEL or info)."),
    ] = None,
) -> None:
    """Run a worker: track events, execute rollbacks, serve the HTTP API.

    Configured with BACKOUT_* environment variables (see docs/configuration.md).
    """
    from consumers.worker import run_worker

    raise typer.Exit(run_worker(loglevel))


@app.command(
    epilog=(
        "Examples:\n\n"
        "  backout rollback --deployment orders-1.1-b2 --reason 'error rate' --wait\n\n"
        "  backout rollback --service orders --version 1.1 --dry-run --wait"
    ),
)
def rollback(
    deployment: Annotated[
        str | None, typer.Option("--deployment", help="Deployment id to roll back.")
    ] = None,
    service: ServiceOption = None,
    version: VersionOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    cascade: Annotated[
        bool, typer.Option("--cascade/--no-cascade", help="Also undo what the events caused.")
    ] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and report only.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (kept with the rollback).")] = None,
    force: Annotated[bool, typer.Option(help="Allow a rollback over the guard.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress until the end.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most.")] = 600.0,
    signal_id: Annotated[
        str | None, typer.Option(help="Rollback id to use (default: a new UUID).")
    ] = None,
) -> None:
    """Publish a rollback signal; prints the rollback id.

    With --wait, follow its status until it ends: exit 0 when completed (or
    planned, for a dry run), 1 when failed or rejected, 2 on timeout.
    """
    from consumers.commands import rollback_command

    raise typer.Exit(
        rollback_command(
            deployment=deployment,
            service=service,
            version=version,
            since=since,
            until=until,
            cascade=cascade,
            dry_run=dry_run,
            reason=reason,
            force=force,
            wait=wait,
            timeout=timeout,
            signal_id=signal_id,
        )
    )


@app.command(
    epilog="Examples:\n\n  backout status\n\n  backout status 3f2c9a0e-...",
)
def status(
    rollback_id: Annotated[str | None, typer.Argument(help="One rollback (default: all).")] = None,
    output: TableOrJsonOption = "table",
) -> None:
    """Show rollback status, as published on the status topic."""
    from consumers.commands import status_command

    raise typer.Exit(status_command(rollback_id, output))


@app.command(
    epilog=(
        "Examples:\n\n"
        "  backout plan --deployment orders-1.1-b2\n\n"
        "  backout plan --service orders --version 1.1 --format markdown > runbook.md"
    ),
)
def plan(
    deployment: Annotated[
        str | None, typer.Option("--deployment", help="Deployment id to plan for.")
    ] = None,
    service: ServiceOption = None,
    version: VersionOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    cascade: Annotated[
        bool, typer.Option("--cascade/--no-cascade", help="Include what the events caused.")
    ] = True,
    output: Annotated[
        str, typer.Option("--format", help="table, json or markdown (an operator runbook).")
    ] = "table",
) -> None:
    """Dry run from the ledger: what a rollback would undo, in order; sends nothing.

    Needs BACKOUT_DATABASE_URL (the worker's ledger) and BACKOUT_SAGAS.
    """
    from consumers.commands import plan_command

    raise typer.Exit(
        plan_command(
            deployment=deployment,
            service=service,
            version=version,
            since=since,
            until=until,
            cascade=cascade,
            output=output,
        )
    )


@app.command(epilog="Example:\n\n  backout deployments --format json")
def deployments(
    output: TableOrJsonOption = "table",
) -> None:
    """Tracked deployments with their event counts by type and version."""
    from consumers.commands import deployments_command

    raise typer.Exit(deployments_command(output))


@app.command(epilog="Example:\n\n  backout retry 5f0c2a8e-6b1d-5d7e-9a53-0c1f2e3d4b5a")
def retry(
    key: Annotated[str, typer.Argument(help="Idempotency key of a failed compensation.")],
) -> None:
    """Give a failed (or blocked) compensation a fresh attempt budget; its rollback resumes."""
    from consumers.commands import retry_command

    raise typer.Exit(retry_command(key))


@app.command(
    epilog="Example:\n\n  backout skip 5f0c2a8e-... --reason 'refunded by hand, ticket OPS-42'"
)
def skip(
    key: Annotated[str, typer.Argument(help="Idempotency key of the compensation.")],
    reason: Annotated[str, typer.Option(help="Why it is skipped (kept in the ledger).")],
) -> None:
    """Give up on a compensation on purpose; what waits on it goes on."""
    from consumers.commands import skip_command

    raise typer.Exit(skip_command(key, reason))


@app.command(epilog="Example:\n\n  backout pause 3f2c9a0e-...")
def pause(rollback_id: RollbackIdArgument) -> None:
    """Pause a running rollback: nothing new starts; in-flight compensations finish."""
    from consumers.commands import pause_command

    raise typer.Exit(pause_command(rollback_id))


@app.command(epilog="Example:\n\n  backout resume 3f2c9a0e-...")
def resume(rollback_id: RollbackIdArgument) -> None:
    """Resume a paused (or failed, after retry/skip) rollback."""
    from consumers.commands import resume_command

    raise typer.Exit(resume_command(rollback_id))


@app.command(epilog="Example:\n\n  backout retire orders-1.1-b2")
def retire(
    deployment_id: Annotated[str, typer.Argument(help="The rolled-back deployment, now gone.")],
) -> None:
    """Retire a rolled-back deployment: its late events are no longer compensated.

    Until then (or until BACKOUT_QUARANTINE_SECONDS pass), events it still emits
    while traffic drains are compensated as they arrive.
    """
    from consumers.commands import retire_command

    raise typer.Exit(retire_command(deployment_id))


dlq_app = typer.Typer(help="Dead letters: list them, replay them to their source topic.")
app.add_typer(dlq_app, name="dlq")


@dlq_app.command(
    "list",
    epilog="Example:\n\n  backout dlq list --source-topic orders.events --format json",
)
def dlq_list(
    source_topic: SourceTopicOption = None,
    match: MatchOption = None,
    output: TableOrJsonOption = "table",
) -> None:
    """List dead letters with their reason and where they came from."""
    from consumers.commands import dlq_list_command

    raise typer.Exit(dlq_list_command(source_topic, match, output))


@dlq_app.command(
    "replay",
    epilog="Example:\n\n  backout dlq replay --match 'no saga declares OrderRefunded'",
)
def dlq_replay(
    source_topic: SourceTopicOption = None,
    match: MatchOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show, do not send.")] = False,
) -> None:
    """Send dead letters' original records back to their source topic."""
    from consumers.commands import dlq_replay_command

    raise typer.Exit(dlq_replay_command(source_topic, match, dry_run))


schemas_app = typer.Typer(help="The wire contract as JSON Schema.")
app.add_typer(schemas_app, name="schemas")


@schemas_app.command("export", epilog="Example:\n\n  backout schemas export docs/schemas")
def schemas_export(
    directory: Annotated[str, typer.Argument(help="Folder to write *.schema.json into.")],
) -> None:
    """Write the JSON Schemas of the envelope, the signal and the status."""
    from pathlib import Path

    from schemas.export import export_json_schemas

    for path in export_json_schemas(Path(directory)):
        typer.echo(str(path))


@app.command(
    epilog="Examples:\n\n  backout demo\n\n  backout demo --orders 50 --keep",
)
def demo(
    orders: Annotated[
        int, typer.Option(min=1, max=100_000, help="Checkouts through each orders version.")
    ] = 200,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave everything running after the summary.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds each wait (worker, tracking, rollback) may take.")
    ] = 120.0,
) -> None:
    """Roll back a bad release of a demo shop, end to end, on this machine.

    Starts an embedded broker, a worker (SQLite in a temporary folder) and the
    shop; sends checkouts through orders 1.0, then the bad 1.1; an alert rolls
    1.1 back. Exit 0 when the shop is consistent again, 1 otherwise.
    """
    from consumers.demo import DemoOptions, run_demo

    raise typer.Exit(run_demo(DemoOptions(orders=orders, keep=keep, timeout=timeout)))


def main() -> None:
    """Entry point of the ``backout`` console script.

    Known failures (bad input, unreachable broker or database) print one
    readable line and exit 1, bad settings exit 2; a mistyped command line
    prints its usage and exits 2; `--debug` anywhere on the line shows
    tracebacks.
    """
    import sys

    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:
        if debug:
            raise
        from consumers.errors import CLICK_EXCEPTION, explain, show_usage_error

        if isinstance(exc, CLICK_EXCEPTION):
            # A mistyped command line: the usage line says what would be right.
            raise SystemExit(show_usage_error(exc)) from None

        message, code = explain(exc)
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(code) from None
    # Outside standalone mode click returns a command's exit code instead of exiting.
    raise SystemExit(code if isinstance(code, int) else 0)
