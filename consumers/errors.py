"""Turning exceptions into one readable CLI line and an exit code."""

from __future__ import annotations

import click
import typer

from sagas.errors import BackoutError

# The exceptions the CLI's parser raises. Typer 0.2x parses with its own copy
# of click, whose exceptions are not `click`'s; `typer.BadParameter` is a
# usage error of whichever click typer uses, so its bases name them.
CLICK_EXCEPTION: type[Exception] = next(
    base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException"
)
ABORTS: tuple[type[BaseException], ...] = (typer.Abort, click.exceptions.Abort, KeyboardInterrupt)


def show_usage_error(exc: Exception) -> int:
    """Print a usage error as typer does (the usage line, a hint, the problem); its exit code."""
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
    except ImportError:  # typer without rich
        exc.show()  # type: ignore[attr-defined]
    return int(exc.exit_code)  # type: ignore[attr-defined]


def explain(exc: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception that reached the CLI (usage errors
    are shown whole by `show_usage_error`, before this)."""
    from aiokafka.errors import KafkaConnectionError, KafkaError
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    from consumers.commands import CommandError

    if isinstance(exc, ABORTS):
        return "aborted", 130
    if isinstance(exc, CommandError | BackoutError):
        return str(exc), 1
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"BACKOUT_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        return f"invalid settings: {problems}", 2
    if isinstance(exc, KafkaConnectionError):
        return f"cannot reach the broker (BACKOUT_BROKER): {exc}", 1
    if isinstance(exc, KafkaError):
        return f"broker error: {exc}", 1
    if isinstance(exc, OperationalError):
        return f"cannot use the ledger database (BACKOUT_DATABASE_URL): {exc.orig}", 1
    if isinstance(exc, SQLAlchemyError):
        return f"ledger error: {exc}", 1
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}", 1
    return f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1
