"""`create_app(settings)`: the faust app of a Backout worker.

Nothing here touches the broker or the database at import time; the app is
built on demand, and its runtime connects when the worker starts.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from consumers.faust_transport import Transport
from consumers.runtime import Runtime
from consumers.settings import Settings
from consumers.web import WebServer
from sagas.registry import SagaRegistry

log = logging.getLogger(__name__)

_RUNTIME_ATTRIBUTE = "backout_runtime"


class _App(faust.App):
    """A faust app whose Kafka consumer waits at most 100 ms per fetch
    (`consumers.faust_transport`); the broker URL is always `kafka://`."""

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)


def create_app(
    settings: Settings | None = None, *, registry: SagaRegistry | None = None
) -> faust.App:
    """Build the worker's faust app.

    Args:
        settings: configuration; read from `BACKOUT_*` when omitted.
        registry: sagas to use instead of loading `settings.sagas` (tests).
    """
    settings = settings or Settings()
    app = _App(
        settings.app_id,
        broker=settings.faust_broker,
        store="memory://",
        # Only sound faust features: at-least-once, no exactly_once (the
        # ledger is idempotent; the development broker has no transactions).
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=settings.heartbeat_interval,
        broker_commit_interval=settings.commit_interval,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        producer_acks=-1,
        stream_wait_empty=False,
        # Backout serves its own HTTP API (consumers.web); faust's web stack
        # and its table-browsing endpoints stay off.
        web_enabled=False,
        autodiscover=False,
        # faust creates this folder even with memory tables; keep it out of
        # the working directory.
        datadir=settings.data_dir
        or str(Path(tempfile.gettempdir()) / f"backout-{settings.app_id}"),
    )
    runtime = Runtime(settings, registry=registry)
    setattr(app, _RUNTIME_ATTRIBUTE, runtime)
    app.service(runtime)  # type: ignore[arg-type]  # faust accepts instances too
    web = WebServer(settings, runtime)
    runtime.web = web  # type: ignore[attr-defined]

    signals_topic = app.topic(
        settings.signals_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
    )

    @app.agent(signals_topic, concurrency=1, name="signals")
    async def signals(stream: Any) -> None:
        async for event in stream.events():
            await runtime.ready()
            assert runtime.signals is not None
            message = event.message
            await runtime.signals.handle_through_outages(
                message.value,
                _headers(message.headers),
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                key=message.key,
            )

    @app.on_partitions_assigned.connect
    async def _assigned(_app: Any, assigned: set[TP], **_: Any) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == settings.signals_topic}
        if mine:
            runtime.add_future(runtime.partitions_assigned(mine))

    @app.on_partitions_revoked.connect
    async def _revoked(_app: Any, revoked: set[TP], **_: Any) -> None:
        theirs = {tp.partition for tp in revoked if tp.topic == settings.signals_topic}
        if theirs:
            await runtime.partitions_revoked(theirs)

    del signals, _assigned, _revoked
    return app


def runtime_of(app: faust.App) -> Runtime:
    """The `Runtime` of an app built by `create_app`."""
    runtime = getattr(app, _RUNTIME_ATTRIBUTE, None)
    if not isinstance(runtime, Runtime):
        raise TypeError("this faust app was not built by backout's create_app")
    return runtime


def _headers(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    return [(str(name), bytes(value) if value is not None else b"") for name, value in items]
