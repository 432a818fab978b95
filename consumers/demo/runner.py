"""`run_demo`: the demo from the command line, with its broker, folder and cleanup.

Everything the demo starts is stopped on every way out: success, failure,
Ctrl-C, SIGTERM or SIGHUP (see `consumers.demo.processes`). The folder with
the ledger and the logs is removed afterwards, unless the demo failed: then
it is kept for a look and its path printed.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from pathlib import Path

from consumers.broker import BrokerError
from consumers.demo.processes import (
    EXIT_INTERRUPTED,
    Children,
    DemoError,
    StopRequests,
)
from consumers.demo.report import Reporter
from consumers.demo.scenario import DemoOptions, Scenario

EXIT_FAILED = 1
INTERRUPT_GRACE = 5.0  # seconds the worker gets to stop when the user is waiting


def run_demo(options: DemoOptions) -> int:
    """Run the demo in the foreground (main thread: it takes over SIGINT/SIGTERM/SIGHUP).

    Returns:
        0 when the shop is consistent after the rollback, 1 when an invariant
        does not hold or the demo failed, 130 when it was interrupted.
    """
    out = Reporter()
    scenario: Scenario | None = None

    def announce(signum: signal.Signals) -> None:
        finished = scenario is not None and scenario.result is not None
        out.console.print()
        out.say(
            f"{signum.name} received: "
            + ("stopping everything" if finished else "interrupted, stopping everything")
        )

    stops = StopRequests(on_signal=announce)
    stops.install()
    workdir = Path(tempfile.mkdtemp(prefix="backout-demo-"))
    children = Children(workdir)
    code: int | None = None
    try:
        out.console.print(
            "[bold]Backout demo[/]: a bad release of the orders service wrote data across "
            "three services; an alert rolls it back."
        )
        out.heading("Starting the embedded Kafka-compatible broker (Tansu, in memory)")
        started = time.monotonic()
        broker = children.start_broker(timeout=options.timeout)
        out.timing("broker ready", time.monotonic() - started)
        out.say(f"broker ready at {broker.bootstrap} (pid {broker.pid})")
        scenario = Scenario(
            options, children=children, reporter=out, workdir=workdir, bootstrap=broker.bootstrap
        )
        code = asyncio.run(_main(scenario, stops))
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except (BrokerError, DemoError) as exc:
        out.error(str(exc))
        code = EXIT_FAILED
    finally:
        stops.shielded = True
        if stops.received is not None and not stops.announced:
            stops.announced = True
            announce(stops.received)
        children.stop_all(
            grace=INTERRUPT_GRACE if stops.received is not None else 10.0, report=out.say
        )
        stops.restore()
        if code in (0, EXIT_INTERRUPTED):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            out.say(f"logs and ledger kept in {workdir}")
        if code == EXIT_INTERRUPTED:
            out.say("demo interrupted; every process it started is stopped")
    return code


async def _main(scenario: Scenario, stops: StopRequests) -> int:
    task = asyncio.current_task()
    assert task is not None
    stops.attach(task)
    try:
        return await scenario.run()
    except asyncio.CancelledError:
        if stops.received is None:
            raise
        # Ctrl-C after the summary of --keep is the normal end: keep its result.
        return scenario.result if scenario.result is not None else EXIT_INTERRUPTED
    finally:
        stops.detach()
