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
    loglevel: Annotated[str, typer.Option(help="Log level: debug, info, warning.")] = "info",
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
    service: Annotated[str | None, typer.Option(help="Service name (with --version).")] = None,
    version: Annotated[str | None, typer.Option(help="Service version (with --service).")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only events at or after this RFC 3339 time.")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Only events at or before this RFC 3339 time.")
    ] = None,
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
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Show rollback status, as published on the status topic."""
    from consumers.commands import status_command

    raise typer.Exit(status_command(rollback_id, output))


def main() -> None:
    """Entry point of the ``backout`` console script.

    Known failures (bad input, unreachable broker or database) print one
    readable line and exit 1; `--debug` anywhere on the line shows tracebacks.
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
        from consumers.errors import explain

        message, code = explain(exc)
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(code) from None
    # Outside standalone mode click returns a command's exit code instead of exiting.
    raise SystemExit(code if isinstance(code, int) else 0)
