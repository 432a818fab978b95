"""The demo's child processes (broker, worker) and how it stops them on any exit.

Ctrl-C, SIGTERM and SIGHUP never leave a process behind: a signal cancels the
running scenario (so its `finally` blocks close the shop's clients), and
`Children.stop_all` then stops the worker and the broker, SIGKILL after a
grace period. The worker runs in a session of its own so that a Ctrl-C in the
terminal reaches the demo only and the demo decides the order of shutdown
(worker first, while the broker it commits to is still there).

A SIGKILL of the demo itself cannot be cleaned up after; everything the demo
started is named (with its pid) in its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import IO, Any

import aiohttp

from consumers.broker import EmbeddedBroker, find_free_port

# Stopped by a signal, as shells report it (128 + SIGINT).
EXIT_INTERRUPTED = 130
WORKER_GRACE = 10.0  # seconds a worker gets to leave its groups after SIGTERM
LOG_TAIL_LINES = 40


class DemoError(Exception):
    """The demo could not go on (a child died, something did not happen in time)."""


def backout_argv(*args: str) -> list[str]:
    """argv running the `backout` CLI of this interpreter (the console script next to it)."""
    script = Path(sys.executable).with_name("backout")
    if script.exists():
        return [str(script), *args]
    # Not installed as a console script (a bare checkout on PYTHONPATH): the
    # child runs elsewhere, so point it at the code this process runs.
    code = str(Path(__file__).resolve().parents[2])
    return [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {code!r}); from consumers.cli import main; main()",
        *args,
    ]


class StopRequests:
    """SIGINT, SIGTERM and SIGHUP as a request to stop the demo cleanly.

    While a scenario task is attached, a signal cancels it (after calling
    `on_signal` on the loop, once); otherwise (broker start-up, synchronous
    code) it raises `KeyboardInterrupt`, unless the demo is already cleaning
    up (`shielded`), where it is only recorded.

    Args:
        on_signal: told of the first signal, in the event loop (where printing
            is safe, unlike in a signal handler).
    """

    SIGNALS = tuple(
        s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s
    )

    def __init__(self, on_signal: Callable[[signal.Signals], None] | None = None) -> None:
        self.received: signal.Signals | None = None
        self.announced = False
        self.shielded = False
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        """Take over the signals (main thread only)."""
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def attach(self, task: asyncio.Task[Any]) -> None:
        """Cancel `task` on the next signal."""
        self._loop = asyncio.get_running_loop()
        self._task = task

    def detach(self) -> None:
        """Back to raising `KeyboardInterrupt`."""
        self._task = self._loop = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
        task, loop = self._task, self._loop
        if task is not None and loop is not None and not task.done():
            # Python runs this handler in the main thread between bytecodes;
            # call_soon_threadsafe also wakes a loop waiting in select().
            loop.call_soon_threadsafe(self._cancel, task)
        elif not self.shielded:
            raise KeyboardInterrupt

    def _cancel(self, task: asyncio.Task[Any]) -> None:
        if not self.announced and self.received is not None and self._on_signal is not None:
            self.announced = True
            self._on_signal(self.received)
        task.cancel()


class WorkerProcess:
    """`backout worker` as a child process, configured by environment variables.

    Args:
        env: the complete environment of the child.
        log_path: receives its stdout and stderr.
        host, port: where its HTTP API listens (must match `env`).
    """

    def __init__(self, env: Mapping[str, str], *, log_path: Path, host: str, port: int) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.host = host
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        """`http://host:port` of the worker's HTTP API."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's pid, once spawned."""
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """True while the child is alive."""
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        """Start the child (returns at once; see `wait_ready`)."""
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            backout_argv("worker"),
            env=self.env,
            # faust keeps a `<app id>-data` folder in its working directory:
            # in the demo's folder it goes away with the rest.
            cwd=self.log_path.parent,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_ready(
        self, http: aiohttp.ClientSession, timeout: float, *, interval: float = 0.1
    ) -> None:
        """Wait until *our* worker answers `GET /health` with 200.

        The log line naming our port proves that the answer comes from our
        child, not from another process on a recycled port.
        """
        deadline = time.monotonic() + timeout
        ours = f"HTTP API on {self.base_url}"
        while True:
            if not self.running:
                raise DemoError(f"the worker exited before it was ready\n{self.log_tail()}")
            if ours in self.log_text():
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"{self.base_url}/health") as response:
                        if response.status == 200:
                            return
            if time.monotonic() > deadline:
                raise DemoError(f"the worker was not ready within {timeout:g}s\n{self.log_tail()}")
            await asyncio.sleep(interval)

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM) without waiting for it."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()

    def stop(self, grace: float = WORKER_GRACE) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; reap it. Idempotent."""
        process = self.process
        if process is not None and process.poll() is None:
            self.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode if process is not None else None

    def log_text(self) -> str:
        """Everything the worker wrote so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of the worker's log, framed for an error message."""
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}\n--- end ---"


class Children:
    """Every process the demo started, and their orderly stop.

    Args:
        workdir: where logs (and the ledger) live.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker: EmbeddedBroker | None = None
        self.worker: WorkerProcess | None = None

    def start_broker(self, timeout: float) -> EmbeddedBroker:
        """Start the embedded broker on a free port; block until it serves metadata."""
        self.broker = EmbeddedBroker(log_path=self.workdir / "tansu.log", grace=3.0)
        with _sigint_blocked():
            self.broker.start(timeout=timeout)
        return self.broker

    def spawn_worker(self, env: Mapping[str, str], host: str = "127.0.0.1") -> WorkerProcess:
        """Start `backout worker` with `env` plus a free HTTP port of its own."""
        port = find_free_port(host)
        full = {**env, "BACKOUT_WEB_HOST": host, "BACKOUT_WEB_PORT": str(port)}
        self.worker = WorkerProcess(
            full, log_path=self.workdir / "worker.log", host=host, port=port
        )
        self.worker.spawn()
        return self.worker

    def check_alive(self) -> None:
        """Raise `DemoError` when the broker or the worker died."""
        if self.broker is not None and not self.broker.is_running:
            raise DemoError(
                f"the broker exited with code {self.broker.returncode}\n{self.broker.log_tail()}"
            )
        if self.worker is not None and self.worker.process is not None and not self.worker.running:
            raise DemoError(
                f"the worker exited with code {self.worker.process.returncode}\n"
                f"{self.worker.log_tail()}"
            )

    def pids(self) -> dict[str, int]:
        """Name → pid of every child started."""
        found = {}
        if self.broker is not None and self.broker.pid is not None:
            found["broker"] = self.broker.pid
        if self.worker is not None and self.worker.pid is not None:
            found["worker"] = self.worker.pid
        return found

    def stop_all(
        self, *, grace: float = WORKER_GRACE, report: Callable[[str], None] | None = None
    ) -> None:
        """Stop the worker (it needs the broker to leave cleanly), then the broker."""
        if self.worker is not None and self.worker.process is not None:
            was_running = self.worker.running
            code = self.worker.stop(grace)
            if report is not None:
                how = "stopped" if was_running else "had already exited"
                report(f"worker (pid {self.worker.pid}) {how}, exit code {code}")
        if self.broker is not None and self.broker.pid is not None:
            was_running = self.broker.is_running
            self.broker.stop()
            if report is not None:
                # A Ctrl-C in the terminal reaches the broker too (same process group).
                how = "stopped" if was_running else "had already exited"
                report(f"broker (pid {self.broker.pid}) {how}, exit code {self.broker.returncode}")


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread meanwhile, and so in the processes it starts.

    A Ctrl-C in the terminal goes to its whole foreground process group, and
    `EmbeddedBroker` starts the broker in ours: a broker that died first would
    leave the worker and the shop's clients hanging on their way out. Children
    inherit the signal mask (through exec), so a broker started with SIGINT
    blocked ignores the terminal's Ctrl-C and is stopped by `stop_all` (SIGTERM)
    after the others. A Ctrl-C meanwhile is only delayed until start-up is over.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to keep apart
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def child_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """Our environment without `BACKOUT_*` and `SHOP_*` settings, plus `overrides`.

    A developer's own settings (another broker, database or token) must not
    leak into the demo's worker.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BACKOUT_", "SHOP_"))}
    base.update(overrides)
    return base
