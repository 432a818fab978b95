"""`backout worker --loglevel warning` keeps the root logger at warning.

faust's terminal spinner would set it to DEBUG (so that every record spins
it), making every library debug call build a log record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from consumers.app import create_app
from consumers.settings import Settings
from consumers.worker import build_worker


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


def test_worker_at_warning_leaves_the_root_logger_at_warning(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKOUT_BROKER", "kafka://127.0.0.1:1")
    worker = build_worker(create_app(Settings()), "warning")
    root_logger.setLevel(logging.WARNING)
    worker.on_setup_root_logger(root_logger, logging.WARNING)
    assert root_logger.level == logging.WARNING
