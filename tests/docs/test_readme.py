"""The README's commands, run as a newcomer would run them.

Every shell block in README.md and docs/ is either run by a test here
(marked `<!-- docs-test: NAME -->`) or says why not
(`<!-- docs-not-run: reason -->`); `test_every_shell_block_is_run_or_explained`
keeps it that way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.broker import find_free_port
from tests.support.docs import (
    ROOT,
    SHELL_LANGUAGES,
    TESTED_BLOCKS,
    block,
    code_blocks,
    documentation_files,
)

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
# Blocks run by a test in this module, by (file, name); other docs test modules
# register theirs the same way (pytest imports every module before running).
TESTED_BLOCKS.update(
    {
        ("README.md", "install-demo"),
        ("README.md", "tour"),
        ("README.md", "python-signal"),
        ("README.md", "saga-module"),
    }
)


def test_every_shell_block_is_run_or_explained() -> None:
    problems = []
    for path in documentation_files():
        for found in code_blocks(path):
            name = str(path.relative_to(ROOT))
            if found.marker == "test":
                if (name, found.label) not in TESTED_BLOCKS:
                    problems.append(f"{found.where}: docs-test {found.label!r} has no test")
            elif found.marker == "not-run":
                if not found.label or len(found.label) < 10:
                    problems.append(f"{found.where}: docs-not-run needs a real reason")
            elif found.language in SHELL_LANGUAGES:
                problems.append(f"{found.where}: shell block neither tested nor explained")
    assert not problems, "\n".join(problems)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[dev]' && python -m pytest" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install[^\n]*-e '\.\[dev\]'", ci)
    assert re.search(r"python\"? -m pytest", ci), "CI must run the README's test command"


def test_saga_module_example_defines_a_valid_saga() -> None:
    namespace: dict[str, object] = {}
    exec(compile(block("saga-module").text, "README.md:saga-module", "exec"), namespace)
    from sagas import Saga
    from sagas.registry import SagaRegistry

    saga = namespace["checkout"]
    assert isinstance(saga, Saga)
    registry = SagaRegistry([saga])
    assert {t for t, _ in saga.steps} == {"OrderPlaced", "PaymentCaptured"}
    assert saga.manual["ReceiptEmailed"].action.startswith("Send the customer")
    assert "OrderViewed" in saga.ignored
    assert registry.resolve("OrderPlaced", 2).__class__.__name__ == "Compensate"


def test_install_and_demo_on_a_fresh_virtualenv(tmp_path: Path) -> None:
    """The README's first command, in a new virtualenv (pip reaches the package index)."""
    command = block("install-demo").text.strip()
    venv = tmp_path / "venv"
    command = command.replace("python -m venv .venv", f"{sys.executable} -m venv {venv}")
    command = command.replace(". .venv/bin/activate", f". {venv}/bin/activate")
    command = command.replace("backout demo", "backout demo --orders 20")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKOUT_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(BIN))
    )
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    elapsed = time.monotonic() - started
    print(f"install + demo took {elapsed:.0f}s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (venv / "bin" / "backout").exists()
    assert "consistent" in result.stdout.lower()


class Tour:
    """Runs the tour's lines in order; `&` lines become background processes."""

    def __init__(self, tmp_path: Path) -> None:
        self.cwd = tmp_path
        self.broker_port = find_free_port()
        self.web_port = find_free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BACKOUT_")}
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PYTHONPATH"] = str(ROOT)
        self.env["BACKOUT_WEB_PORT"] = str(self.web_port)
        self.env["BACKOUT_APP_ID"] = f"tour-{self.broker_port}"
        self.background: list[subprocess.Popen[bytes]] = []
        self.outputs: dict[str, str] = {}

    def adapt(self, line: str) -> str:
        """Free ports instead of the defaults, so the test never collides with anything."""
        return line.replace("9092", str(self.broker_port)).replace("6066", str(self.web_port))

    def run(self, line: str) -> str:
        line = self.adapt(line)
        if line.startswith("export "):
            for name, value in re.findall(r"(\w+)=(\S+)", line):
                self.env[name] = value
            return ""
        if line.endswith("&"):
            log = open(self.cwd / f"bg-{len(self.background)}.log", "wb")  # noqa: SIM115
            self.background.append(
                subprocess.Popen(
                    ["bash", "-c", line[:-1]],
                    cwd=self.cwd,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            return ""
        result = subprocess.run(
            ["bash", "-c", line],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{line!r} failed:\n{result.stdout}\n{result.stderr}"
        self.outputs[line] = result.stdout
        return result.stdout

    def wait(self, what: str, check: object, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.background:
                assert process.poll() is None, f"a background command died while waiting for {what}"
            try:
                if check():  # type: ignore[operator]
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; logs in {self.cwd}")

    def http_json(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        for process in self.background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.background:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    running = Tour(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def _orders_tracked(tour: Tour, deployment_id: str) -> int:
    """How many checkouts of a deployment are fully tracked (placed and receipted)."""
    listed = json.loads(tour.run("backout deployments --format json"))
    by_type = next((d["by_type"] for d in listed if d["deployment_id"] == deployment_id), {})
    placed = by_type.get("OrderPlaced v1", 0) + by_type.get("OrderPlaced v2", 0)
    return min(placed, by_type.get("ReceiptEmailed v1", 0))


def test_tour(tour: Tour) -> None:
    from examples.shop.flow import ORDERS_BAD

    lines = [text for text in block("tour").text.splitlines() if text.strip()]
    rollback_id = None
    for line in lines:
        output = tour.run(line)
        if line.startswith("backout broker"):
            tour.wait("the broker", lambda: _port_open(tour.broker_port))
        elif line.startswith("backout worker"):
            tour.wait("the worker's /health", lambda: tour.http_json("/health")["status"] == "ok")
        elif line.startswith("python -m examples.shop.services"):
            tour.wait(
                f"20 checkouts of {ORDERS_BAD.deployment_id} in the ledger",
                lambda: _orders_tracked(tour, ORDERS_BAD.deployment_id) >= 20,
            )
        elif line.startswith("backout deployments"):
            assert "orders-1.1-b2" in output
            assert "orders-1.0-a1" in output
        elif line.startswith("backout plan"):
            assert "# Rollback runbook: orders-1.1-b2" in output
            assert "## 3. Manual actions" in output
            assert "ReceiptEmailed" in output
        elif line.startswith("backout rollback"):
            rollback_id = output.strip().splitlines()[0]
            assert re.fullmatch(r"[0-9a-f-]{36}", rollback_id)
            assert "completed" in output
        elif line.startswith("backout status"):
            assert rollback_id in output
            assert "completed_with_warnings" in output
        elif line.startswith("curl"):
            listed = json.loads(output)
            [ours] = [r for r in listed if r["rollback_id"] == rollback_id]
            assert ours["state"] == "completed_with_warnings"
            assert ours["planned"] == ours["applied"] == ours["confirmed"] > 0
            assert ours["manual"] == 20

    # The plain-Kafka example, against the same broker: a second rollback of
    # the same deployment finds everything already undone and completes.
    script = tour.cwd / "publish_rollback.py"  # not signal.py: that would shadow the stdlib
    script.write_text(tour.adapt(block("python-signal").text))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=tour.env
    )
    assert result.returncode == 0, result.stderr
    second = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", second)
    tour.wait(
        "the plain-Kafka rollback to complete",
        lambda: tour.http_json(f"/api/rollbacks/{second}")["state"] == "completed_with_warnings",
    )
    detail = tour.http_json(f"/api/rollbacks/{second}")
    assert detail["signal"]["requested_by"] == "my-deploy-bot"


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_tour_has_curl() -> None:
    assert shutil.which("curl"), "the tour uses curl; install it (apt-get install curl)"
