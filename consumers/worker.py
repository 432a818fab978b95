"""`backout worker`: run the faust app built by `create_app`."""

from __future__ import annotations

import gc
import logging
from typing import Any

from consumers.app import create_app
from consumers.memory import WORKER_GC_THRESHOLDS
from consumers.settings import Settings


def run_worker(loglevel: str | None = None) -> int:
    """Run a worker in the foreground until SIGINT/SIGTERM; returns the exit code."""
    from consumers.observability import configure_tracing

    gc.set_threshold(*WORKER_GC_THRESHOLDS)
    settings = Settings()
    loglevel = loglevel or settings.log_level
    configure_tracing(settings)
    app = create_app(settings)
    logging.basicConfig(level=loglevel.upper())
    build_worker(app, loglevel).execute_from_commandline()
    return 0


def build_worker(app: Any, loglevel: str) -> Any:
    """The faust worker for `app`, without its terminal spinner.

    At `warning` and above faust spins a progress spinner on every log
    record: it sets the root logger to DEBUG so that every record reaches
    the spinner, and every aiokafka/aiosqlite debug call then builds a
    record nobody reads (measured: ~10% of a worker's CPU in a rollback).
    A service's log has no use for a spinner.
    """
    from faust.worker import Worker

    worker = Worker(app, loglevel=loglevel, quiet=True)
    worker.spinner = None
    return worker
