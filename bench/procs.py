"""The benchmark's moving parts: broker, databases, worker and helper subprocesses.

Every process the benchmark starts is its own child and is stopped by its
own pid; nothing here looks for processes by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from consumers.broker import EmbeddedBroker, find_free_port

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT = 90.0


class BenchError(RuntimeError):
    """A benchmark step failed (the message says which, with a log tail)."""


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment minus BACKOUT_* and OTLP export, plus the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    env.update(extra)
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    """The end of a log file, framed for an error message."""
    try:
        text = path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- {path} (last {lines} lines) ---\n{tail}\n---"


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of a live process, in MB (10^6 bytes)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """Current resident set size (VmRSS) of a live process, in MB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stat(process: Path) -> tuple[str, list[str]] | None:
    """A process's command name and the fields of its /proc/<pid>/stat after
    it, counted from utime's index 11 (None: the process is gone)."""
    try:
        with open(process / "stat") as stat:
            # The command name (field 2) may hold spaces and parentheses: it
            # ends at the last ")".
            head, rest = stat.read().rsplit(")", 1)
    except OSError:
        return None
    return head.split("(", 1)[1], rest.split()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time a live process (all its threads) has used, in seconds."""
    stat = None if pid is None else _proc_stat(Path(f"/proc/{pid}"))
    if stat is None:
        return None
    fields = stat[1]
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def postgres_cpu_seconds() -> float | None:
    """CPU time the local PostgreSQL server has used, all its processes, in seconds.

    Its live processes' own time, plus what the postmaster's exited children
    (connections closed since) used, which the kernel adds to the postmaster
    once it reaps them. None when no PostgreSQL runs on this machine (a
    remote server's time cannot be read here).
    """
    total, found = 0, False
    for process in Path("/proc").iterdir():
        stat = _proc_stat(process) if process.name.isdigit() else None
        if stat is None or stat[0] not in ("postgres", "postmaster"):
            continue  # not a process, exited meanwhile, or not PostgreSQL's
        found = True
        # utime, stime, and the reaped children's cutime, cstime.
        total += sum(int(v) for v in stat[1][11:15])
    return total / CLOCK_TICKS if found else None


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores together."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    total = sum(ticks[:8])  # guest time is counted in user already
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


# ----------------------------------------------------------------------- broker


@contextlib.contextmanager
def broker(workdir: Path) -> Any:
    """A fresh embedded broker (Tansu, memory storage) for one scenario."""
    instance = EmbeddedBroker(log_path=workdir / f"tansu-{uuid.uuid4().hex[:6]}.log")
    instance.start(timeout=30)
    try:
        yield instance
    finally:
        instance.stop()


# -------------------------------------------------------------------- databases


@dataclass
class Database:
    """A throwaway ledger database: a SQLite file, or a PostgreSQL database."""

    kind: str  # "sqlite" | "postgres"
    url: str
    name: str

    @property
    def label(self) -> str:
        return "SQLite" if self.kind == "sqlite" else "PostgreSQL"


@contextlib.asynccontextmanager
async def database(kind: str, workdir: Path) -> AsyncIterator[Database]:
    """Create a fresh, migrated ledger database and drop it afterwards."""
    from sagas.ledger import Ledger

    name = f"bench_{uuid.uuid4().hex[:12]}"
    if kind == "sqlite":
        path = workdir / f"{name}.db"
        db = Database(kind, f"sqlite+aiosqlite:///{path}", name)
    elif kind == "postgres":
        import asyncpg

        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        db = Database(kind, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}", name)
    else:
        raise ValueError(f"unknown database kind {kind!r}")
    try:
        ledger = await Ledger.open(db.url)
        await ledger.close()
        yield db
    finally:
        if os.environ.get("BENCH_KEEP_DB"):
            pass
        elif kind == "sqlite":
            _remove_sqlite(workdir / f"{name}.db")
        else:
            import asyncpg

            admin = await asyncpg.connect(PG_ADMIN_DSN)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


async def postgres_available() -> str | None:
    """None when the PostgreSQL server answers, else the reason it does not."""
    try:
        import asyncpg

        connection = await asyncio.wait_for(asyncpg.connect(PG_ADMIN_DSN), 5)
        await connection.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------- subprocesses


@dataclass
class Child:
    """A subprocess with its log file; stopped by its own pid."""

    argv: Sequence[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            list(self.argv),
            env=self.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self, what: str) -> None:
        if not self.alive:
            code = self.process.returncode if self.process else None
            raise BenchError(f"{what} exited with code {code}\n{log_tail(self.log_path)}")

    def stop(self, timeout: float = 20.0, how: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(how)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode


def backout_argv(*args: str) -> list[str]:
    """argv of the `backout` CLI of this interpreter (the installed console script)."""
    script = Path(sys.executable).with_name("backout")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from consumers.cli import main; main()", *args]


class Worker(Child):
    """A real `backout worker` subprocess."""

    def __init__(self, settings: Mapping[str, str], log_path: Path) -> None:
        self.port = find_free_port()
        env = {
            "BACKOUT_WEB_HOST": "127.0.0.1",
            "BACKOUT_WEB_PORT": str(self.port),
            # A 2 s session lets a fresh group form in ~1 s (BROKER.md: the
            # broker holds a join for half the session timeout).
            "BACKOUT_SESSION_TIMEOUT": "2",
            "BACKOUT_HEARTBEAT_INTERVAL": "0.5",
            **settings,
        }
        # The default log level (info). At `warning` faust keeps its terminal
        # spinner and sets the root logger to DEBUG so that every record
        # spins it: every aiokafka/aiosqlite debug call then builds a record
        # (measured: ~10% of the worker's CPU during a rollback).
        super().__init__(backout_argv("worker"), child_env(env), log_path)

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Wait until /health answers 200; returns the seconds since start."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.check_alive("backout worker")
            if await asyncio.to_thread(self.health) == 200:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        raise BenchError(f"worker not ready after {timeout:g}s\n{log_tail(self.log_path)}")


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


async def run_json(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path, timeout: float
) -> dict[str, Any]:
    """Run a helper to completion; its last stdout line is a JSON result."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        _write(log_path, out + b"\n--- stderr ---\n" + err)
        raise BenchError(
            f"{argv[:4]} still running after {timeout:g}s\n{log_tail(log_path)}"
        ) from None
    _write(log_path, out + b"\n--- stderr ---\n" + err)
    if process.returncode != 0:
        raise BenchError(
            f"{argv[:4]} failed with exit code {process.returncode}\n{log_tail(log_path)}"
        )
    lines = [line for line in out.decode().splitlines() if line.strip()]
    if not lines:
        raise BenchError(f"{argv[:4]} printed no result\n{log_tail(log_path)}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def workdir(keep: bool) -> tempfile.TemporaryDirectory[str] | None:
    """A temporary folder for logs and SQLite files (None: the caller picks one)."""
    return None if keep else tempfile.TemporaryDirectory(prefix="backout-bench-")
