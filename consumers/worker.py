"""`backout worker`: run the faust app built by `create_app`."""

from __future__ import annotations

import logging

from consumers.app import create_app
from consumers.settings import Settings


def run_worker(loglevel: str = "info") -> int:
    """Run a worker in the foreground until SIGINT/SIGTERM; returns the exit code."""
    from faust.worker import Worker

    from consumers.observability import configure_tracing

    settings = Settings()
    configure_tracing(settings)
    app = create_app(settings)
    logging.basicConfig(level=loglevel.upper())
    worker = Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0
