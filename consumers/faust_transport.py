"""faust's Kafka transport, with the worker consumer's fetch wait bounded.

faust 0.15.3 builds the aiokafka consumer behind its agents with
`fetch_max_wait_ms=1500`, fixed. A broker may hold an empty fetch that long
even when records arrive meanwhile: the embedded development broker does
(BROKER.md), and a rollback signal then reached the `signals` agent 70-160 ms
after it was published in the benchmark (a plain consumer waiting 1,500 ms:
184-522 ms; waiting 100 ms: 2-49 ms). Real Kafka answers a waiting fetch as
soon as records arrive, so there the bound only adds a few empty fetches a
second while nothing happens. The tracker's own consumer uses the same bound.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

# How long the broker may hold a fetch of the signals (and any other agent's) topics.
FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by `AIOKafkaConsumer.start()` when it builds its fetcher, which
        # faust calls later; there is no setting for it in faust.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """faust's aiokafka transport; its consumer waits at most `FETCH_MAX_WAIT_MS`."""

    Consumer = _Consumer
