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


def main() -> None:
    """Entry point of the ``backout`` console script."""
    app()
