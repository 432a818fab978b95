"""`backout worker` as a real subprocess, for end-to-end tests.

A worker is ready when its own HTTP server (the log line naming our port
proves it is ours, not another process on a recycled port) answers
`GET /health` with 200: the ledger is open and migrated, the producer is
connected and the tracker has joined its group.

Example:
    >>> worker = WorkerProcess(env, log_path=tmp_path / "worker.log")  # doctest: +SKIP
    >>> await worker.start()  # doctest: +SKIP
    >>> await worker.get("/api/deployments")  # doctest: +SKIP
    >>> worker.kill(); await worker.start()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from consumers.broker import find_free_port

READY_TIMEOUT = 60.0  # generous: a 2-core CI machine runs the suite and the worker
STOP_TIMEOUT = 20.0
_LOG_TAIL_LINES = 60

# Every `backout worker` readiness time of this test session, in seconds; the
# e2e conftest prints a summary (the issue asks how long a worker takes).
READINESS: list[float] = []


def backout_command(*args: str) -> list[str]:
    """argv running the `backout` CLI of the interpreter running the tests."""
    script = Path(sys.executable).with_name("backout")
    if script.exists():
        return [str(script), *args]
    # Not installed as a console script (e.g. a bare checkout on PYTHONPATH).
    return [sys.executable, "-c", "from consumers.cli import main; main()", *args]


def subprocess_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment of a Backout subprocess: ours minus BACKOUT_* (which would
    leak a developer's settings into the test), plus `env`, plus the repo on
    PYTHONPATH so saga modules under `tests.` import."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    repo = str(Path(__file__).resolve().parents[2])
    path = base.get("PYTHONPATH")
    base["PYTHONPATH"] = f"{repo}{os.pathsep}{path}" if path else repo
    # Tracing to an OTLP collector that does not exist would only add noise.
    base.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    base.update(env)
    return base


def run_module(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` from the repository's root, in a Backout subprocess's
    environment, with nothing on its stdin and its output captured (the
    benchmark's commands, as docs/benchmarks.md shows them)."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=Path(__file__).resolve().parents[2],
        env=subprocess_env({}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class WorkerError(AssertionError):
    """The worker died, or did not become ready in time (message has the log tail)."""


class WorkerProcess:
    """One `backout worker` subprocess, restartable with the same settings.

    Args:
        env: `BACKOUT_*` settings (and anything else) for the worker; the web
            port is chosen here unless `BACKOUT_WEB_PORT` is given.
        log_path: file receiving the worker's stdout and stderr (appended, so a
            restart keeps the previous run's log above a marker line).
    """

    def __init__(self, env: Mapping[str, str], *, log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.host = self.env.setdefault("BACKOUT_WEB_HOST", "127.0.0.1")
        self.port = int(self.env.get("BACKOUT_WEB_PORT") or find_free_port(self.host))
        self._fixed_port = "BACKOUT_WEB_PORT" in env
        self.env["BACKOUT_WEB_PORT"] = str(self.port)
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_seconds: float | None = None
        self.starts = 0
        self._log: IO[bytes] | None = None
        self._log_offset = 0
        self._started_at = 0.0

    @property
    def base_url(self) -> str:
        """`http://host:port` of the worker's HTTP API."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the subprocess is alive."""
        return self.process is not None and self.process.poll() is None

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, timeout: float = READY_TIMEOUT) -> float:
        """Start the worker and wait until it is ready; returns the seconds it took."""
        return await asyncio.to_thread(self.start_sync, timeout)

    def start_sync(self, timeout: float = READY_TIMEOUT) -> float:
        """`start` for sync code (fixtures)."""
        if self.running:
            raise RuntimeError("worker already running")
        for attempt in range(3):
            self._spawn()
            try:
                return self._wait_ready(timeout)
            except WorkerError:
                taken = "address already in use" in self.log_since_start().lower()
                if not taken or self._fixed_port or attempt == 2:
                    self.kill()
                    raise
                # Another process took the port between probing and binding.
                self.port = find_free_port(self.host)
                self.env["BACKOUT_WEB_PORT"] = str(self.port)
        raise AssertionError("unreachable")

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to clean up (crash simulation)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._close_log()

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); returns the exit code."""
        return await asyncio.to_thread(self.stop_sync, timeout)

    def stop_sync(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """`stop` for sync code (fixtures)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        self._close_log()
        return self.process.returncode

    async def restart(self, *, crash: bool = False, timeout: float = READY_TIMEOUT) -> float:
        """Stop (or SIGKILL, when `crash`) and start again; returns the readiness time."""
        if crash:
            self.kill()
        else:
            await self.stop()
        return await self.start(timeout)

    def _spawn(self) -> None:
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log_offset = self._log.tell()
        marker = f"\n===== test harness: start #{self.starts} on port {self.port} =====\n"
        self._log.write(marker.encode())
        self._log.flush()
        self._log_offset += len(marker)
        self._started_at = time.monotonic()
        self.process = subprocess.Popen(
            backout_command("worker"),
            env=subprocess_env(self.env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C in the terminal reaches pytest only,
            # and the harness decides how the worker ends.
            start_new_session=True,
        )

    def _wait_ready(self, timeout: float) -> float:
        deadline = self._started_at + timeout
        ours = f"HTTP API on {self.base_url}"
        last: object = None
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise WorkerError(
                    f"worker exited with code {self.process.returncode} before it was ready\n"
                    + self.log_tail()
                )
            if ours in self.log_since_start():
                try:
                    status, body = self._get_sync("/health")
                except OSError as exc:
                    last = exc
                else:
                    last = (status, body)
                    if status == 200:
                        break
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerError(
                    f"worker not ready within {timeout:g}s (last /health: {last!r})\n"
                    + self.log_tail()
                )
            time.sleep(0.05)
        self.ready_seconds = time.monotonic() - self._started_at
        READINESS.append(self.ready_seconds)
        app_id = self.env.get("BACKOUT_APP_ID", "?")
        print(f"worker {app_id} (start #{self.starts}) ready in {self.ready_seconds:.2f}s")
        return self.ready_seconds

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- logs -----------------------------------------------------------------------

    def log_since_start(self) -> str:
        """The log written by the current (or last) run."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the log, framed for a failure message."""
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            text = "(no log file)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}\n--- end of log ---"

    # -- HTTP -----------------------------------------------------------------------

    def _get_sync(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())

    async def fetch(self, path: str) -> tuple[int, Any]:
        """GET a path of the worker's API: (HTTP status, decoded JSON body)."""
        return await asyncio.to_thread(self._get_sync, path)

    async def get(self, path: str, *, expect: int = 200) -> Any:
        """GET a path of the worker's API and return the decoded JSON body.

        Raises:
            AssertionError: another status than `expect` (with the body and log tail).
        """
        status, body = await self.fetch(path)
        if status != expect:
            raise AssertionError(
                f"GET {path} answered {status} (expected {expect}): {body!r}\n" + self.log_tail()
            )
        return body


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


async def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run `backout <args>` as a subprocess without blocking the event loop.

    Returns:
        The completed process (text stdout/stderr); the caller asserts the code.

    Raises:
        AssertionError: it ran longer than `timeout` (it is killed).
    """
    argv = backout_command(*args)
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=subprocess_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"`backout {' '.join(args)}` still running after {timeout:g}s\n"
            f"stdout: {out.decode()}\nstderr: {err.decode()}"
        ) from None
    assert process.returncode is not None
    return subprocess.CompletedProcess(argv, process.returncode, out.decode(), err.decode())
