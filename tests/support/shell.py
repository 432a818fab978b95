"""Running documented shell blocks as a reader would, one terminal line at a time.

`ShellSession` keeps one environment across blocks (`export` lines change
it, evaluated by bash so `$(...)` and quotes work), runs commands that never
exit (`backout broker`, `backout worker`, the shop) or end in `&` in the
background, and fails the test when a foreground command exits non-zero.

Ports are the one thing adapted: the documented 9092 (broker) and 6066 (HTTP)
become free ports, so a test never collides with anything on the machine.

Example:
    >>> session = ShellSession(tmp_path)  # doctest: +SKIP
    >>> for line in session.lines(block("quickstart-broker", page).text):  # doctest: +SKIP
    ...     session.run(line)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from consumers.broker import find_free_port
from tests.support.docs import ROOT

BIN = Path(sys.executable).parent
# Commands that serve until stopped: a reader runs each in its own terminal.
LONG_RUNNING = ("backout broker", "backout worker", "python -m examples.shop.services")


class ShellSession:
    """One reader's terminals: shared environment, background servers, outputs.

    Args:
        cwd: the working directory of every command (a test's tmp_path).
        env: extra environment (not shown in the docs: test-only tuning).
    """

    def __init__(self, cwd: Path, env: Mapping[str, str] | None = None) -> None:
        self.cwd = cwd
        self.broker_port = find_free_port()
        self.web_port = find_free_port()
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BACKOUT_", "OTEL_", "VIRTUAL_ENV"))
        }
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PYTHONPATH"] = str(ROOT)
        self.env["BACKOUT_WEB_PORT"] = str(self.web_port)
        self.env["BACKOUT_APP_ID"] = f"docs-{self.broker_port}"
        # A shorter group session than the default 6 s: consumer groups form
        # faster on the development broker. Behaviour is otherwise the same.
        self.env["BACKOUT_SESSION_TIMEOUT"] = "2"
        self.env.update(env or {})
        self.background: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.outputs: dict[str, subprocess.CompletedProcess[str]] = {}

    # -- lines ----------------------------------------------------------------------

    @staticmethod
    def lines(text: str) -> list[str]:
        """The block's commands: continuation lines joined, comments and blanks dropped."""
        joined: list[str] = []
        pending = ""
        for raw in text.splitlines():
            line = raw.rstrip()
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            line = (pending + line.strip()).strip()
            pending = ""
            if line and not line.startswith("#"):
                joined.append(line)
        return joined

    def adapt(self, line: str) -> str:
        """Free ports instead of the documented ones."""
        return line.replace("9092", str(self.broker_port)).replace("6066", str(self.web_port))

    # -- running --------------------------------------------------------------------

    def run(self, line: str, *, check: bool = True) -> str:
        """Run one line; returns its stdout ('' for exports and background commands)."""
        line = self.adapt(line)
        if line.startswith("export "):
            self._export(line)
            return ""
        if re.match(r"^\w+=\S", line):
            # `NAME=$(command)`: an interactive shell keeps NAME for later lines.
            self._export(f"export {line}")
            return ""
        if line.endswith("&") or line.startswith(LONG_RUNNING):
            self._background(line.removesuffix("&").strip())
            return ""
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {line}"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.outputs[line] = result
        if check:
            assert result.returncode == 0, (
                f"{line!r} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
                f"\n{self.logs()}"
            )
        return result.stdout

    def run_block(self, text: str, after: Callable[[str, str], None] | None = None) -> None:
        """Run every line of a block; `after(line, output)` is called after each."""
        for line in self.lines(text):
            output = self.run(line)
            if after is not None:
                after(line, output)

    def _export(self, line: str) -> None:
        result = subprocess.run(
            ["bash", "-c", f"{line} && env -0"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, f"{line!r} failed: {result.stderr.decode()}"
        exported = dict(
            item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item
        )
        names = re.findall(r"(?:^|\s)(\w+)=", line.removeprefix("export "))
        for name in names:
            if name in exported:
                self.env[name] = exported[name]

    def _background(self, command: str) -> None:
        log = (self.cwd / f"bg-{len(self.background)}.log").open("wb")
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.background.append((command, process))

    # -- waiting --------------------------------------------------------------------

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60) -> None:
        """Poll `check` until truthy; fail when a background command dies or time runs out."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for command, process in self.background:
                if process.poll() is not None:
                    raise AssertionError(
                        f"{command!r} exited ({process.returncode}) while waiting for {what}"
                        f"\n{self.logs()}"
                    )
            try:
                if check():
                    return
            except Exception as exc:  # not ready yet: connection refused, 503, ...
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what} (last error: {last!r})\n{self.logs()}")

    def wait_ready(self, line: str) -> None:
        """After a background line: wait until the server it started answers."""
        if line.startswith("backout broker"):
            self.wait("the broker", lambda: port_open(self.broker_port))
        elif line.startswith("backout worker"):
            self.wait("the worker's /health", lambda: self.http("/health")["status"] == "ok")

    # -- HTTP -----------------------------------------------------------------------

    def http(
        self,
        path: str,
        *,
        method: str = "GET",
        body: object = None,
        token: str | None = None,
    ) -> Any:
        """Call the worker's API; returns the decoded JSON (raises on HTTP errors)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def rollback(self, rollback_id: str) -> dict[str, Any]:
        """`GET /api/rollbacks/{id}`, or {} while the worker does not know it yet."""
        try:
            found = self.http(f"/api/rollbacks/{rollback_id}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return {}
            raise
        return dict(found)

    def wait_state(self, rollback_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until a rollback is in one of `states`; returns its detail."""
        self.wait(
            f"rollback {rollback_id} to be {' or '.join(states)}",
            lambda: self.rollback(rollback_id).get("state") in states,
            timeout,
        )
        return self.rollback(rollback_id)

    # -- the end --------------------------------------------------------------------

    def logs(self, lines: int = 40) -> str:
        """The tails of the background commands' logs, for failure messages."""
        parts = []
        for index, (command, _) in enumerate(self.background):
            path = self.cwd / f"bg-{index}.log"
            text = path.read_text("utf-8", "replace") if path.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {command} ({path}) ---\n{tail}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM every background command (SIGKILL after 15 s), newest first."""
        for _, process in reversed(self.background):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _, process in reversed(self.background):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0
