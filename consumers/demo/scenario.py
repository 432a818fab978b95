"""The demo's story, once the broker runs: worker, shop, traffic, alert, rollback, checks.

1. `backout worker` starts as a child process (SQLite ledger in the demo's
   folder, the shop's checkout saga, fast group joins for the embedded broker).
2. The shop (orders, payments, inventory; in this process) takes checkouts
   through orders 1.0, then through orders 1.1.
3. Once the worker has tracked every event, an alert for orders 1.1 goes to
   the worker's Alertmanager webhook, which publishes the rollback signal.
4. Progress comes from the `backout.status` topic; meanwhile the shop's state
   is watched until it is consistent again.
5. The shop's invariants are checked and a summary printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from consumers.client import follow_status
from consumers.demo.alert import Alert, raise_alert
from consumers.demo.checks import Measured, Summary, count_records, judge
from consumers.demo.processes import Children, DemoError, WorkerProcess, child_env
from consumers.demo.report import Reporter
from consumers.settings import Settings
from examples.shop.flow import ORDERS_BAD, ORDERS_STABLE, Deployment
from examples.shop.schemas import ShopTopics
from examples.shop.services import Shop, ShopService, ensure_topics
from schemas import RollbackState, RollbackStatus

_T = TypeVar("_T")

DEFAULT_ORDERS = 200
DEFAULT_TIMEOUT = 120.0
PLACEMENT_CONCURRENCY = 16  # checkouts in flight at once: lets the producer batch
ERROR_RATE = 0.12  # what the alert says orders 1.1 does, for the story
SHOP_STOP_TIMEOUT = 5.0
STEP_MARGIN = 10.0  # seconds a step may take beyond --timeout before it counts as hung


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What `backout demo` can be asked.

    Attributes:
        orders: checkouts placed through each orders version.
        keep: leave everything running after the summary, until Ctrl-C.
        timeout: seconds each wait (worker ready, tracking, rollback) may take.
    """

    orders: int = DEFAULT_ORDERS
    keep: bool = False
    timeout: float = DEFAULT_TIMEOUT


class Scenario:
    """One run of the story against a running broker.

    Attributes:
        result: the exit code once the checks ran (kept when --keep is ended by Ctrl-C).
    """

    def __init__(
        self,
        options: DemoOptions,
        *,
        children: Children,
        reporter: Reporter,
        workdir: Path,
        bootstrap: str,
    ) -> None:
        self.options = options
        self.children = children
        self.out = reporter
        self.workdir = workdir
        self.bootstrap = bootstrap
        self.run_id = uuid.uuid4().hex[:8]
        self.topics = ShopTopics()
        self.ledger_path = workdir / "ledger.db"
        self.settings = Settings(
            broker=f"kafka://{bootstrap}",
            database_url=f"sqlite+aiosqlite:///{self.ledger_path}",
            app_id=f"backout-demo-{self.run_id}",
            topic_prefix="backout.",
            signal_key=None,
            api_token=None,
        )
        self.result: int | None = None
        self._shop_changed = asyncio.Event()

    def worker_env(self) -> dict[str, str]:
        """The worker's settings: this run's broker, ledger and app id; fast timings."""
        s = self.settings
        return child_env(
            {
                "BACKOUT_BROKER": s.broker,
                "BACKOUT_DATABASE_URL": s.database_url,
                "BACKOUT_SAGAS": "examples.shop.saga",
                "BACKOUT_APP_ID": s.app_id,
                "BACKOUT_TOPIC_PREFIX": s.topic_prefix,
                # BROKER.md: the embedded broker holds a group join for half the
                # session timeout; 2 s makes the worker ready in about 2.5 s.
                "BACKOUT_SESSION_TIMEOUT": "2",
                "BACKOUT_HEARTBEAT_INTERVAL": "0.5",
                "BACKOUT_COMMIT_INTERVAL": "0.5",
                "BACKOUT_POLL_INTERVAL": "0.2",
                "BACKOUT_TOPIC_REFRESH_SECONDS": "1",
                "BACKOUT_MAX_COMPENSATIONS": str(max(10_000, 4 * self.options.orders)),
            }
        )

    async def run(self) -> int:
        """Tell the story; return 0 when the shop is consistent again, 1 otherwise."""
        topics = [*self.topics.all_events(), *self.topics.all_commands()]
        # Created before the worker starts, so its tracker finds them at once.
        await self._within("creating the shop's topics", ensure_topics(self.bootstrap, topics))
        self.out.heading("Starting Backout")
        started = time.monotonic()
        worker = self.children.spawn_worker(self.worker_env())
        self.out.say(
            f"backout worker started (pid {worker.pid}), HTTP API {worker.base_url}, "
            f"ledger {self.ledger_path}"
        )
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            ready = asyncio.create_task(self._worker_ready(http, worker, started))
            shop = Shop(
                self.bootstrap,
                topics=self.topics,
                group_prefix=f"demo-{self.run_id}-shop",
                session_timeout_ms=2_000,
                heartbeat_interval_ms=500,
                on_change=self._on_shop_change,
            )
            try:
                return await self._guarded(self._story(http, worker, shop, ready))
            finally:
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ready
                if self.children.worker is not None:
                    # Leaving its groups takes the worker a moment: in parallel.
                    self.children.worker.terminate()
                started = time.monotonic()
                await _stop_shop(shop)
                self.out.say(f"shop stopped ({time.monotonic() - started:.1f}s)")

    async def _story(
        self,
        http: aiohttp.ClientSession,
        worker: WorkerProcess,
        shop: Shop,
        ready: asyncio.Task[None],
    ) -> int:
        await self._within("starting the shop", _start_shop(shop))
        self.out.say("shop started: orders, payments, inventory (in this process)")
        await self._within("orders 1.0", self._traffic(shop, ORDERS_STABLE, "the good release"))
        await self._within("orders 1.1", self._traffic(shop, ORDERS_BAD, "the bad release"))
        await self._within("starting the worker", ready)
        forward = await self._within("tracking", self._wait_tracked(http, worker, shop))

        self.out.heading(f"Alert: orders {ORDERS_BAD.service_version} fails checkouts")
        alert = await self._within(
            "raising the alert",
            raise_alert(http, worker.base_url, ORDERS_BAD, error_rate=ERROR_RATE),
        )
        self.out.say(
            f"DeploymentHighErrorRate fired for {ORDERS_BAD.deployment_id} → {alert.path}; "
            f"rollback {alert.rollback_id}"
        )
        status, completed, consistent = await self._within("rollback", self._follow(alert, shop))

        self.out.heading("Checking the shop")
        summary = await self._within(
            "checking", self._verify(http, shop, status, alert, forward, completed, consistent)
        )
        self.out.summary(summary)
        self.result = 0 if summary.ok else 1
        if summary.ok:
            self.out.console.print("\n[bold green]The shop is consistent again.[/]")
        else:
            self.out.console.print("\n[bold red]The shop is NOT consistent.[/]")
        if self.options.keep:
            await self._keep(worker, alert)
        return self.result

    def _on_shop_change(self, _service: ShopService) -> None:
        self._shop_changed.set()

    # -- steps ---------------------------------------------------------------------

    async def _worker_ready(
        self, http: aiohttp.ClientSession, worker: WorkerProcess, started: float
    ) -> None:
        await worker.wait_ready(http, self.options.timeout)
        seconds = time.monotonic() - started
        self.out.timing("worker ready", seconds)
        self.out.say(f"backout worker ready in {seconds:.1f}s (GET /health → 200)")

    async def _traffic(self, shop: Shop, deployment: Deployment, label: str) -> None:
        count = self.options.orders
        self.out.heading(
            f"Deploying orders {deployment.service_version} ({deployment.deployment_id}), "
            f"{label}: {count} checkouts"
        )
        started = time.monotonic()
        before = len(shop.checkouts)
        # Concurrent runs of the shop's own traffic generator; each run makes
        # every third checkout a legacy one, so runs of at least 6 keep that mix.
        size = max(6, -(-count // PLACEMENT_CONCURRENCY))
        sizes = [min(size, count - start) for start in range(0, count, size)]
        with self.out.counter("checkouts", count) as (progress, task):
            placing = asyncio.gather(
                *(shop.place_demo_orders(n, deployment=deployment) for n in sizes)
            )
            try:
                while not placing.done():
                    progress.update(task, completed=len(shop.checkouts) - before)
                    await asyncio.wait([placing], timeout=0.1)
                await placing
            finally:
                placing.cancel()  # when we were cancelled: asyncio.wait leaves it running
            progress.update(task, completed=len(shop.checkouts) - before)
        seconds = time.monotonic() - started
        placed = shop.checkouts_of(deployment.deployment_id)
        events = sum(len(c.events) for c in placed)
        legacy = sum(1 for c in placed if c.one("OrderPlaced").schema_version == 1)
        self.out.timing(f"orders {deployment.service_version}", seconds)
        self.out.say(
            f"{len(placed)} checkouts, {events} events in {seconds:.1f}s "
            f"({legacy} of them still emit OrderPlaced v1: Backout upcasts them)"
        )

    async def _wait_tracked(
        self, http: aiohttp.ClientSession, worker: WorkerProcess, shop: Shop
    ) -> int:
        expected = sum(len(c.events) for c in shop.checkouts)
        self.out.heading("Backout tracks every event in its ledger")
        self.out.say("(a new tracker starts at the earliest offset: nothing sent before is missed)")
        started = time.monotonic()
        deadline = started + self.options.timeout
        tracked = 0
        with self.out.counter("events tracked", expected) as (progress, task):
            while tracked < expected:
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"only {tracked} of {expected} events tracked after "
                        f"{self.options.timeout:g}s\n{worker.log_tail()}"
                    )
                tracked = await _tracked_events(http, worker.base_url)
                progress.update(task, completed=min(tracked, expected))
                if tracked < expected:
                    await asyncio.sleep(0.2)
        self.out.timing("tracking", time.monotonic() - started)
        return tracked

    async def _follow(self, alert: Alert, shop: Shop) -> tuple[RollbackStatus, float, float | None]:
        """Follow the status topic to the end; return (final status, seconds to it,
        seconds until the shop was consistent or None)."""
        consistent_at: float | None = None

        async def watch_shop() -> None:
            nonlocal consistent_at
            while True:
                self._shop_changed.clear()
                if not shop.problems_after_rollback(ORDERS_BAD.deployment_id):
                    consistent_at = time.monotonic()
                    return
                await self._shop_changed.wait()

        watcher = asyncio.create_task(watch_shop())
        try:
            with self.out.rollback_progress() as bars:
                final = await follow_status(
                    self.settings,
                    alert.rollback_id,
                    timeout=self.options.timeout,
                    on_status=bars.show,
                )
            completed = time.monotonic() - alert.raised_at
            if final is None:
                last = bars.last.state.value if bars.last else "no status at all"
                raise DemoError(
                    f"rollback {alert.rollback_id} did not finish within "
                    f"{self.options.timeout:g}s (last state: {last})"
                )
            if final.state in (RollbackState.COMPLETED, RollbackState.COMPLETED_WITH_WARNINGS):
                # Confirmations come after the services applied the commands,
                # so the shop should already be consistent; give it a moment.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(watcher), 5.0)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self.out.timing("rollback", completed)
        self.out.say(f"rollback {final.state.value} {completed:.1f}s after the alert")
        consistent = consistent_at - alert.raised_at if consistent_at is not None else None
        return final, completed, consistent

    async def _verify(
        self,
        http: aiohttp.ClientSession,
        shop: Shop,
        status: RollbackStatus,
        alert: Alert,
        forward: int,
        completed: float,
        consistent: float | None,
    ) -> Summary:
        worker = self.children.worker
        assert worker is not None
        dead, total = await asyncio.gather(
            count_records(self.bootstrap, self.settings.dlq_topic),
            _tracked_events(http, worker.base_url),
        )
        return judge(
            shop,
            status,
            Measured(
                events_forward=forward,
                events_total=total,
                dead_letters=dead,
                signal_to_completed=completed,
                signal_to_consistent=consistent,
                alert_path=alert.path,
            ),
        )

    async def _keep(self, worker: WorkerProcess, alert: Alert) -> None:
        broker = self.settings.broker
        self.out.console.print(
            "\n[bold]Everything keeps running; press Ctrl-C to stop.[/]\n"
            f"  status page  {worker.base_url}/\n"
            f"  rollback     {worker.base_url}/api/rollbacks/{alert.rollback_id}\n"
            f"  CLI          BACKOUT_BROKER={broker} backout status\n"
            f"  ledger       {self.ledger_path} (SQLite), e.g.\n"
            f"               sqlite3 {self.ledger_path} "
            "'select state, count(*) from compensations group by state'\n"
            f"  worker log   {worker.log_path}\n"
            f"  broker       {self.bootstrap} (in memory: lost when the demo stops)",
            soft_wrap=True,
        )
        while True:
            await asyncio.sleep(0.5)
            self.children.check_alive()

    async def _within(self, step: str, awaitable: Awaitable[_T]) -> _T:
        """Await a step; a `DemoError` naming it when it hangs (a sick broker, say)."""
        # A margin, so that steps with deadlines of their own report first.
        limit = self.options.timeout + STEP_MARGIN
        try:
            async with asyncio.timeout(limit):
                return await awaitable
        except TimeoutError:
            raise DemoError(f"{step}: not done after {limit:g}s") from None

    async def _guarded(self, story: Awaitable[_T]) -> _T:
        """Run `story`, failing fast when the broker or the worker dies meanwhile."""

        async def watch() -> None:
            while True:
                self.children.check_alive()
                await asyncio.sleep(0.5)

        main = asyncio.ensure_future(story)
        watchdog = asyncio.create_task(watch())
        try:
            await asyncio.wait([main, watchdog], return_when=asyncio.FIRST_COMPLETED)
            if main.done():
                return main.result()
            watchdog.result()  # raises the DemoError naming the dead child
            raise AssertionError("the watchdog ended without an error")
        finally:
            for task in (main, watchdog):
                task.cancel()
            await asyncio.gather(main, watchdog, return_exceptions=True)


# ------------------------------------------------------------------------ helpers


async def _start_shop(shop: Shop) -> None:
    """Start the three services at once (each joins a consumer group: ~1 s apiece)."""
    results = await asyncio.gather(
        *(s.start() for s in shop.services.values()), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await _stop_shop(shop)
        raise failures[0]


async def _stop_shop(shop: Shop) -> None:
    """Stop the three services at once; never hang the exit on a broken broker."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            asyncio.gather(*(s.stop() for s in shop.services.values())), SHOP_STOP_TIMEOUT
        )


async def _tracked_events(http: aiohttp.ClientSession, base_url: str) -> int:
    """Events in the worker's ledger, over all deployments (0 while it starts)."""
    try:
        async with http.get(f"{base_url}/api/deployments") as response:
            if response.status != 200:
                return 0
            deployments: list[dict[str, Any]] = await response.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0
    return sum(int(d.get("events", 0)) for d in deployments)
