"""Turning exceptions into one readable CLI line and an exit code."""

from __future__ import annotations

import click

from sagas.errors import BackoutError


def explain(exc: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception that reached the CLI."""
    from aiokafka.errors import KafkaConnectionError, KafkaError
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    from consumers.commands import CommandError

    if isinstance(exc, click.exceptions.UsageError):
        return exc.format_message(), 2
    if isinstance(exc, click.exceptions.Abort | KeyboardInterrupt):
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
