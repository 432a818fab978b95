"""Everything a worker holds besides faust itself: ledger, engine, producer, tracker.

A `mode.Service` started with the faust app. Agents wait for `ready()`
before touching the ledger, so no message is processed half-initialised.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from mode import Service

from consumers.decoding import EventDecoder
from consumers.metrics import PrometheusObserver
from consumers.publisher import DeadLetters, KafkaPublisher, StatusPublisher
from consumers.settings import Settings
from consumers.signals import SignalIntake
from consumers.tracker import Tracker
from sagas.clock import SystemClock
from sagas.engine import RollbackEngine
from sagas.errors import LedgerError
from sagas.ledger import Ledger
from sagas.ledger.connection import display_url
from sagas.registry import SagaRegistry, load_registry

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36


class Runtime(Service):
    """Owns the worker's resources and their start/stop order."""

    def __init__(
        self, settings: Settings, *, registry: SagaRegistry | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        # Saga modules are imported here, from settings only (never from
        # message content); a broken module fails the worker at once.
        self.registry = registry or load_registry(settings.saga_modules)
        self.clock = SystemClock()
        self._ready = asyncio.Event()
        self.ledger: Ledger | None = None
        self.publisher: KafkaPublisher | None = None
        self.engine: RollbackEngine | None = None
        self.signals: SignalIntake | None = None
        self.tracker: Tracker | None = None
        self.dead_letters: DeadLetters | None = None
        self._owned_partitions: set[int] = set()
        self._reconcile_failing = False

    async def ready(self) -> None:
        """Wait until the ledger, producer and engine are up."""
        await self._ready.wait()

    @property
    def is_ready(self) -> bool:
        """True once started."""
        return self._ready.is_set()

    async def on_start(self) -> None:
        """Open the ledger (migrating it), connect, create topics, start tracking."""
        s = self.settings
        try:
            self.ledger = await Ledger.open(s.database_url)
        except Exception as exc:
            # The driver's own error ("Connect call failed") does not say what
            # was being connected to.
            raise LedgerError(
                f"cannot open the ledger {display_url(s.database_url)} (BACKOUT_DATABASE_URL): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        await self._create_topics()
        self.publisher = KafkaPublisher(s.bootstrap_servers, client_id=f"{s.app_id}-producer")
        await self.publisher.start()
        status = StatusPublisher(self.publisher, s.status_topic)
        self.dead_letters = DeadLetters(self.publisher, self.ledger, s.dlq_topic)
        self.engine = RollbackEngine(
            self.ledger,
            self.registry,
            commands=self.publisher,
            status=status,
            failures=self.dead_letters,
            clock=self.clock,
            settings=s.engine_settings(),
            observer=PrometheusObserver(),
        )
        self.signals = SignalIntake(
            self.engine,
            status=status,
            dead_letters=self.dead_letters,
            clock=self.clock,
            signal_key=s.signal_key,
        )
        self.tracker = Tracker(
            s,
            ledger=self.ledger,
            engine=self.engine,
            decoder=EventDecoder(self.registry, track_unknown=s.unknown_events == "track"),
            dead_letters=self.dead_letters,
            clock=self.clock,
            loop=self.loop,
            beacon=self.beacon,
        )
        # A signal waits for tracking to catch up before its blast radius is read.
        self.engine.tracking = self.tracker
        await self.add_runtime_dependency(self.tracker)
        self._ready.set()
        web = getattr(self, "web", None)
        if web is not None:
            await self.add_runtime_dependency(web)
        log.info(
            "backout runtime ready: ledger %s, sagas %s",
            display_url(s.database_url),
            [saga.name for saga in self.registry.sagas],
        )

    async def on_stop(self) -> None:
        """Stop runs (they resume from the ledger), then disconnect."""
        if self.engine is not None:
            await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.ledger is not None:
            await self.ledger.close()

    async def partitions_assigned(self, partitions: set[int]) -> None:
        """Signal partitions now ours: resume their unfinished rollbacks."""
        await self.ready()
        assert self.engine is not None
        self._owned_partitions |= partitions
        resumed = await self.engine.resume(partitions)
        if resumed:
            log.info("resumed rollbacks %s", resumed)

    async def partitions_revoked(self, partitions: set[int]) -> None:
        """Signal partitions moved away: stop their runs (the new owner resumes them)."""
        self._owned_partitions -= partitions
        if self.engine is None or self.ledger is None:
            return
        running = set(self.engine.running())
        if not running:
            return
        moving = [
            r.rollback_id
            for r in await self.ledger.active_rollbacks(partitions)
            if r.rollback_id in running
        ]
        await self.engine.stop(moving)

    @Service.timer(5.0)
    async def _reconcile(self) -> None:
        """Pick up rollbacks that need a run here (operator actions from the CLI, late items)."""
        if not self.is_ready or self.engine is None:
            return
        try:
            # Only rollbacks whose signal partition this worker owns: another
            # worker resumes the rest.
            await self.engine.resume(self._owned_partitions)
        except Exception as exc:
            # The traceback once; while it keeps failing (a ledger outage
            # lasts), one line every 5 s says it still does.
            if self._reconcile_failing:
                log.warning("reconcile still failing: %s: %s", type(exc).__name__, exc)
            else:
                log.warning("reconcile failed; retrying every 5 s", exc_info=True)
            self._reconcile_failing = True
            return
        if self._reconcile_failing:
            log.warning("reconcile works again")
        self._reconcile_failing = False

    async def _create_topics(self) -> None:
        s = self.settings
        admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
        try:
            await admin.start()  # in the try: a failed start leaves its client open
            names = (s.signals_topic, s.status_topic, s.dlq_topic)
            existing = set(await admin.list_topics())
            missing = [n for n in names if n not in existing]
            if missing:
                await admin.create_topics(
                    [
                        NewTopic(
                            n,
                            num_partitions=s.topic_partitions,
                            replication_factor=s.topic_replication,
                        )
                        for n in missing
                    ]
                )
        except Exception as exc:
            if getattr(exc, "errno", None) != TOPIC_ALREADY_EXISTS:
                raise
        finally:
            await admin.close()
