"""The worker's faust consumer waits at most `FETCH_MAX_WAIT_MS` per fetch.

faust builds its aiokafka consumer with a 1,500 ms fetch wait, and a broker
that holds an empty fetch until the wait ends (the development broker) then
delivers a rollback signal up to 1.5 s late (see `consumers.faust_transport`).
"""

from __future__ import annotations

import inspect

import pytest
from aiokafka import AIOKafkaConsumer

from consumers.app import create_app
from consumers.faust_transport import FETCH_MAX_WAIT_MS, Transport
from consumers.settings import Settings


async def test_the_agents_consumer_is_built_with_the_bounded_fetch_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKOUT_BROKER", "kafka://127.0.0.1:1")  # nothing connects
    app = create_app(Settings())
    assert isinstance(app.transport, Transport)
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    try:
        assert consumer._fetch_max_wait_ms == FETCH_MAX_WAIT_MS == 100
        # Everything else is faust's own choice, as before.
        assert consumer._group_id == app.conf.id
        assert consumer._enable_auto_commit is False
    finally:
        await consumer.stop()


async def test_aiokafka_builds_its_fetcher_from_the_attribute_that_is_set() -> None:
    # The transport sets aiokafka's private `_fetch_max_wait_ms` after faust
    # built the consumer and before faust starts it; this is where a newer
    # aiokafka could stop reading it.
    plain = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=123)
    try:
        assert plain._fetch_max_wait_ms == 123
        assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(
            AIOKafkaConsumer.start
        )
    finally:
        await plain.stop()
