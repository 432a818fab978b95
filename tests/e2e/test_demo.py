"""`backout demo` as a user runs it: a subprocess, its output, its exit code, its children.

The demo starts its own broker and worker, so these tests need no fixture;
what they check besides the summary is that no process and no port outlives
the demo, however it ends (success, Ctrl-C, SIGTERM, Ctrl-C after --keep).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.worker import backout_command, subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ORDERS = 30
COMPENSATED_PER_CHECKOUT = 3  # OrderPlaced, PaymentCaptured, StockReserved
MANUAL_PER_CHECKOUT = 1  # ReceiptEmailed: a correction e-mail
RUN_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0  # the worker gets 5 s after SIGTERM, then SIGKILL

BROKER_LINE = re.compile(r"broker ready at 127\.0\.0\.1:(\d+) \(pid (\d+)\)")
WORKER_LINE = re.compile(
    r"backout worker started \(pid (\d+)\), HTTP API http://127\.0\.0\.1:(\d+), ledger (\S+)"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Demo:
    """A running `backout demo` and what it printed so far."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_line(self, pattern: str, timeout: float = RUN_TIMEOUT) -> re.Match[str]:
        """Read output until a line matches `pattern`; return the match."""
        regex = re.compile(pattern)
        for line in self.lines:
            if found := regex.search(line):
                return found
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r}:\n{self.output}")
            assert self.process.stdout is not None
            try:
                raw = await asyncio.wait_for(self.process.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not raw:
                raise AssertionError(f"the demo ended without {pattern!r}:\n{self.output}")
            line = ANSI.sub("", raw.decode("utf-8", "replace").rstrip("\n"))
            self.lines.append(line)
            if found := regex.search(line):
                return found

    async def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        """Read the rest of the output and wait for the exit code (SIGKILL on timeout)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        try:
            while raw := await asyncio.wait_for(
                self.process.stdout.readline(), max(deadline - time.monotonic(), 0.01)
            ):
                self.lines.append(ANSI.sub("", raw.decode("utf-8", "replace").rstrip("\n")))
            return await asyncio.wait_for(
                self.process.wait(), max(deadline - time.monotonic(), 0.01)
            )
        except TimeoutError:
            os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
            raise AssertionError(
                f"the demo was still running after {timeout:g}s:\n{self.output}"
            ) from None

    def children(self) -> Children:
        """The broker and worker the demo said it started."""
        broker = BROKER_LINE.search(self.output)
        worker = WORKER_LINE.search(self.output)
        assert broker, f"the demo did not name its broker:\n{self.output}"
        assert worker, f"the demo did not name its worker:\n{self.output}"
        return Children(
            broker_port=int(broker[1]),
            broker_pid=int(broker[2]),
            worker_pid=int(worker[1]),
            web_port=int(worker[2]),
            ledger=Path(worker[3]),
        )

    def row(self, name: str) -> list[int]:
        """The numbers of the summary table's row starting with `name`."""
        for line in self.lines:
            cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
            if cells and cells[0] == name:
                return [int(c) for c in cells[1:] if c.isdigit()]
        raise AssertionError(f"no summary row {name!r}:\n{self.output}")


@dataclass(frozen=True)
class Children:
    broker_port: int
    broker_pid: int
    worker_pid: int
    web_port: int
    ledger: Path


async def start_demo(*args: str) -> Demo:
    """`backout demo <args>` in a session of its own, as a terminal would run it."""
    process = await asyncio.create_subprocess_exec(
        *backout_command("demo", *args),
        env=subprocess_env({"PYTHONIOENCODING": "utf-8", "NO_COLOR": "1"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Its own process group: `killpg` then does what Ctrl-C in a terminal does.
        start_new_session=True,
    )
    return Demo(process)


def _alive(pid: int) -> bool:
    """True when `pid` runs (a zombie waiting for init to reap it does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return not re.search(r"^State:\s+Z", status, re.MULTILINE)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def leftovers(children: Children) -> list[str]:
    """Everything of the demo's that still runs or listens."""
    found = []
    if _alive(children.broker_pid):
        found.append(f"broker pid {children.broker_pid} still runs")
    if _alive(children.worker_pid):
        found.append(f"worker pid {children.worker_pid} still runs")
    # Also any other process started for this demo: a tansu on its port, a
    # worker with its web port (in case a pid printed was not the whole story).
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not _alive(int(proc.name)):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"tcp://127.0.0.1:{children.broker_port}" in cmdline:
            found.append(f"pid {proc.name} still serves the demo's broker port: {cmdline}")
        if f"BACKOUT_WEB_PORT={children.web_port}".encode() in environ:
            found.append(f"pid {proc.name} still has the demo's worker settings: {cmdline}")
    for name, port in (("broker", children.broker_port), ("worker", children.web_port)):
        if _accepts_connections(port):
            found.append(f"the {name} port {port} still accepts connections")
    return found


async def test_demo_rolls_back_the_bad_release_and_leaves_nothing_behind() -> None:
    demo = await start_demo("--orders", str(ORDERS))
    code = await demo.finish()

    assert code == 0, demo.output
    assert "The shop is consistent again." in demo.output
    for check in (
        f"✔ all {ORDERS} orders of orders-1.1-b2 cancelled, refunded and their stock released "
        f"({ORDERS}/{ORDERS})",
        f"✔ all {ORDERS} orders of orders-1.0-a1 untouched ({ORDERS}/{ORDERS})",
        "✔ stock = initial stock - what the orders of 1.0 reserved",
        "✔ 0 dead-lettered records",
        "✔ rollback ended completed_with_warnings",
    ):
        assert check in demo.output, f"missing {check!r}:\n{demo.output}"
    assert "✘" not in demo.output
    assert "alert raised through: Alertmanager webhook POST" in demo.output

    compensations = COMPENSATED_PER_CHECKOUT * ORDERS
    for row in ("compensations planned", "compensations applied", "compensations confirmed"):
        assert demo.row(row) == [compensations, compensations], row
    assert demo.row("compensations failed") == [0, 0]
    assert demo.row("manual actions (correction e-mails)") == [MANUAL_PER_CHECKOUT * ORDERS] * 2
    assert demo.row("dead-lettered records (backout.dlq)") == [0, 0]
    assert demo.row("checkouts through orders 1.0 (good)") == [ORDERS]
    assert demo.row("checkouts through orders 1.1 (bad)") == [ORDERS]
    # Each confirmed compensation adds one confirmation event to the ledger.
    (forward,) = demo.row("events tracked before the alert")
    assert demo.row("events tracked in all (with confirmations)") == [forward + compensations]
    assert "timings:" in demo.output

    children = demo.children()
    assert leftovers(children) == []
    assert not children.ledger.parent.exists(), "the demo's temporary folder is removed"


@pytest.mark.parametrize(
    ("signum", "to_group", "after"),
    [
        # Ctrl-C in a terminal signals the whole process group, while the worker starts.
        pytest.param(signal.SIGINT, True, r"backout worker started", id="ctrl-c-at-start"),
        # An orchestrator's SIGTERM to the demo alone, while the rollback runs.
        pytest.param(signal.SIGTERM, False, r"DeploymentHighErrorRate fired", id="sigterm-mid-run"),
    ],
)
async def test_a_signal_stops_the_demo_promptly_without_orphans(
    signum: signal.Signals, to_group: bool, after: str
) -> None:
    demo = await start_demo("--orders", "200")
    try:
        await demo.wait_for_line(after)
    except BaseException:
        os.killpg(demo.process.pid, signal.SIGKILL)
        raise
    children = demo.children()
    sent = time.monotonic()
    if to_group:
        os.killpg(demo.process.pid, signum)
    else:
        demo.process.send_signal(signum)
    code = await demo.finish(timeout=STOP_TIMEOUT + 5)
    took = time.monotonic() - sent

    assert code == 130, demo.output
    assert took < STOP_TIMEOUT, f"the demo took {took:.1f}s to stop:\n{demo.output}"
    assert f"{signum.name} received: interrupted, stopping everything" in demo.output
    assert leftovers(children) == [], demo.output
    assert not children.ledger.parent.exists(), "the demo's temporary folder is removed"


async def test_keep_leaves_everything_running_until_ctrl_c() -> None:
    demo = await start_demo("--orders", "10", "--keep")
    try:
        await demo.wait_for_line(r"press Ctrl-C to stop")
        page = await demo.wait_for_line(r"status page\s+(http://\S+/)")
        rollback = await demo.wait_for_line(r"rollback\s+(http://\S+/api/rollbacks/\S+)")
        await demo.wait_for_line(r"CLI\s+BACKOUT_BROKER=kafka://127\.0\.0\.1:\d+ backout status")
        children = demo.children()

        # Still up after the summary: the worker's page and API answer.
        status, _ = await asyncio.to_thread(_get, page[1])
        assert status == 200
        status, body = await asyncio.to_thread(_get, rollback[1])
        assert status == 200
        assert json.loads(body)["state"] == "completed_with_warnings"
        assert children.ledger.exists()
        assert _alive(children.broker_pid)
        assert _alive(children.worker_pid)
    except BaseException:
        os.killpg(demo.process.pid, signal.SIGKILL)
        raise

    os.killpg(demo.process.pid, signal.SIGINT)
    code = await demo.finish(timeout=STOP_TIMEOUT + 5)

    assert code == 0, "Ctrl-C is how --keep ends; the exit code is the demo's result"
    assert "SIGINT received: stopping everything" in demo.output
    assert leftovers(children) == [], demo.output


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()
