"""The pages under docs/, run as a reader would run them.

Every block marked `<!-- docs-test: NAME -->` in the pages below is run here
(and registered in `TESTED_BLOCKS`, which
`test_readme.py::test_every_shell_block_is_run_or_explained` checks). The
shell blocks run in a `ShellSession` against a real embedded broker and
`backout worker` processes; Python blocks are executed; the generated JSON
Schemas and the settings table are compared with the code.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from consumers.settings import Settings
from schemas.export import json_schemas
from schemas.signal import sign
from tests.support import span_tree
from tests.support.docs import ROOT, TESTED_BLOCKS, block
from tests.support.kafka import Producer, envelope
from tests.support.shell import ShellSession

DOCS = ROOT / "docs"
QUICKSTART = DOCS / "quickstart.md"
SAGA_AUTHORING = DOCS / "saga-authoring.md"
WIRE = DOCS / "wire-contract.md"
RUNBOOK = DOCS / "operations" / "runbook.md"
OBSERVABILITY = DOCS / "observability.md"
CONFIGURATION = DOCS / "configuration.md"

TESTED_BLOCKS.update(
    {
        ("docs/quickstart.md", "quickstart-broker"),
        ("docs/quickstart.md", "quickstart-worker"),
        ("docs/quickstart.md", "quickstart-shop"),
        ("docs/quickstart.md", "quickstart-look"),
        ("docs/quickstart.md", "quickstart-rollback"),
        ("docs/quickstart.md", "quickstart-status"),
        ("docs/saga-authoring.md", "billing-saga"),
        ("docs/saga-authoring.md", "billing-saga-test"),
        ("docs/saga-authoring.md", "billing-entry-point"),
        ("docs/wire-contract.md", "sign-python"),
        ("docs/wire-contract.md", "sign-shell"),
        ("docs/wire-contract.md", "schemas-export"),
        ("docs/operations/runbook.md", "runbook-trigger-cli"),
        ("docs/operations/runbook.md", "runbook-trigger-http"),
        ("docs/operations/runbook.md", "runbook-status"),
        ("docs/operations/runbook.md", "runbook-find-failed"),
        ("docs/operations/runbook.md", "runbook-retry"),
        ("docs/operations/runbook.md", "runbook-skip"),
        ("docs/operations/runbook.md", "runbook-pause"),
        ("docs/operations/runbook.md", "runbook-resume"),
        ("docs/operations/runbook.md", "runbook-drill"),
        ("docs/observability.md", "obs-tree"),
        ("docs/observability.md", "obs-worker"),
        ("docs/observability.md", "obs-shop"),
        ("docs/observability.md", "obs-rollback"),
        ("docs/observability.md", "obs-metrics"),
    }
)

BAD = "orders-1.1-b2"


@pytest.fixture
def session(tmp_path: Path) -> Iterator[ShellSession]:
    running = ShellSession(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def _start(session: ShellSession, text: str) -> None:
    """Run lines that start servers, waiting until each one answers."""
    for line in session.lines(text):
        session.run(line)
        session.wait_ready(line)


def _orders_tracked(session: ShellSession, deployment_id: str) -> int:
    """How many checkouts of a deployment are fully tracked (placed and receipted)."""
    listed = json.loads(session.run("backout deployments --format json"))
    by_type = next((d["by_type"] for d in listed if d["deployment_id"] == deployment_id), {})
    placed = by_type.get("OrderPlaced v1", 0) + by_type.get("OrderPlaced v2", 0)
    return int(min(placed, by_type.get("ReceiptEmailed v1", 0)))


def _events_tracked(session: ShellSession, deployment_id: str) -> int:
    listed = json.loads(session.run("backout deployments --format json"))
    return int(next((d["events"] for d in listed if d["deployment_id"] == deployment_id), 0))


def _recorder(outputs: dict[str, str]) -> Callable[[str, str], None]:
    def record(line: str, output: str) -> None:
        outputs[line] = output

    return record


def _output_of(outputs: dict[str, str], start: str) -> str:
    [found] = [output for line, output in outputs.items() if line.startswith(start)]
    return found


# ------------------------------------------------------------------ configuration


def _documented_settings() -> dict[str, str]:
    """`BACKOUT_*` name → the default column, from the tables of configuration.md."""
    rows = re.findall(
        r"^\| `(BACKOUT_\w+)` \| ([^|]+) \|", CONFIGURATION.read_text(), flags=re.MULTILINE
    )
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "a setting is documented twice"
    return {name: default.strip() for name, default in rows}


def _shown_default(value: object) -> str:
    """How configuration.md writes a default."""
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def test_configuration_documents_every_setting_with_its_default() -> None:
    documented = _documented_settings()
    expected = {f"BACKOUT_{name.upper()}": f for name, f in Settings.model_fields.items()}
    missing = sorted(set(expected) - set(documented))
    stale = sorted(set(documented) - set(expected))
    assert not missing, f"docs/configuration.md does not document {missing}"
    assert not stale, f"docs/configuration.md documents settings that do not exist: {stale}"
    wrong = {
        name: (documented[name], _shown_default(field.default))
        for name, field in expected.items()
        if documented[name] != _shown_default(field.default)
    }
    assert not wrong, f"defaults differ (documented, actual): {wrong}"


def test_configuration_names_the_otel_variables_the_worker_reads() -> None:
    text = CONFIGURATION.read_text()
    source = (ROOT / "consumers" / "observability.py").read_text()
    for name in sorted(set(re.findall(r'"(OTEL_[A-Z_]+)"', source))):
        assert f"`{name}`" in text, f"{name} is read by consumers/observability.py"


# ------------------------------------------------------------------- JSON Schemas


def test_committed_json_schemas_are_what_the_code_produces() -> None:
    committed = {
        path.name.removesuffix(".schema.json"): json.loads(path.read_text())
        for path in sorted((DOCS / "schemas").glob("*.json"))
    }
    assert committed == json_schemas(), (
        "docs/schemas/ is stale: run `backout schemas export docs/schemas` and commit it"
    )


def test_schemas_export_block_writes_the_committed_files(session: ShellSession) -> None:
    session.run_block(block("schemas-export", WIRE).text)
    written = sorted((session.cwd / "docs" / "schemas").glob("*.json"))
    assert [p.name for p in written] == sorted(p.name for p in (DOCS / "schemas").glob("*.json"))
    for path in written:
        assert path.read_text() == (DOCS / "schemas" / path.name).read_text()


# ----------------------------------------------------------------- saga authoring


def test_saga_authoring_example_and_its_tests_pass(tmp_path: Path) -> None:
    """The page's module and test module, saved as files and run with pytest."""
    (tmp_path / "billing_saga.py").write_text(block("billing-saga", SAGA_AUTHORING).text)
    (tmp_path / "test_billing_saga.py").write_text(block("billing-saga-test", SAGA_AUTHORING).text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore",
            "test_billing_saga.py",
        ],
        cwd=tmp_path,
        env={**_clean_env(), "PYTHONPATH": f"{tmp_path}:{ROOT}"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout


def test_saga_authoring_entry_point_names_the_saga(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sagas import Saga
    from sagas.registry import ENTRY_POINT_GROUP

    (tmp_path / "billing_saga.py").write_text(block("billing-saga", SAGA_AUTHORING).text)
    monkeypatch.syspath_prepend(str(tmp_path))
    declared = tomllib.loads(block("billing-entry-point", SAGA_AUTHORING).text)
    [(group, entries)] = declared["project"]["entry-points"].items()
    assert group == ENTRY_POINT_GROUP
    for name, value in entries.items():
        loaded = EntryPoint(name, value, group).load()
        assert isinstance(loaded, Saga)
        assert loaded.name == "billing"


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("BACKOUT_", "PYTEST_"))}


# --------------------------------------------------------------------- quickstart


@pytest.mark.e2e
def test_quickstart(session: ShellSession) -> None:
    _start(session, block("quickstart-broker", QUICKSTART).text)
    _start(session, block("quickstart-worker", QUICKSTART).text)
    session.run_block(block("quickstart-shop", QUICKSTART).text)
    session.wait(
        f"20 checkouts of {BAD} in the ledger", lambda: _orders_tracked(session, BAD) >= 20
    )

    outputs: dict[str, str] = {}
    session.run_block(block("quickstart-look", QUICKSTART).text, _recorder(outputs))
    deployments = _output_of(outputs, "backout deployments")
    assert BAD in deployments
    assert "orders-1.0-a1" in deployments
    # The numbers the page quotes.
    assert f"Plan for {BAD}: 99 events, 60 compensations" in _output_of(outputs, "backout plan")

    session.run_block(block("quickstart-rollback", QUICKSTART).text, _recorder(outputs))
    dry = _output_of(outputs, "backout rollback --deployment orders-1.1-b2 --dry-run")
    assert "planned" in dry
    assert "0/60" in dry
    real = _output_of(outputs, "backout rollback --deployment orders-1.1-b2 --reason")
    rollback_id = real.splitlines()[0].strip()
    assert "completed_with_warnings" in real
    assert "60/60" in real

    session.run_block(block("quickstart-status", QUICKSTART).text, _recorder(outputs))
    assert rollback_id in _output_of(outputs, "backout status")
    listed = json.loads(_output_of(outputs, "curl"))
    [ours] = [r for r in listed if r["rollback_id"] == rollback_id]
    assert ours["state"] == "completed_with_warnings"
    assert ours["planned"] == ours["applied"] == ours["confirmed"] == 60
    assert ours["manual"] == 20
    assert "<title>Backout</title>" in session.http("/")


# ---------------------------------------------------------------------- runbook

SIGNAL_KEY = "runbook-signal-key"
API_TOKEN = "runbook-api-token"
DRILL = "booking-2.3-x1"
SLOW = "booking-2.4-y2"


async def _produce_seats(bootstrap: str, deployment_id: str, seats: list[dict[str, Any]]) -> None:
    """`SeatBooked` events (tests/support/drill_saga.py) on `drill.events`; a seat's
    `instance` (default: one instance per seat) becomes its `correlation_id`."""
    start = datetime.now(UTC) - timedelta(minutes=5)
    async with Producer(bootstrap) as producer:
        for index, seat in enumerate(seats):
            payload = {k: v for k, v in seat.items() if k != "instance"}
            document = envelope(
                "SeatBooked",
                service="booking",
                deployment_id=deployment_id,
                service_version=deployment_id.split("-")[1],
                payload=payload,
                correlation_id=str(seat.get("instance", f"booking-{seat['seat']}")),
                key=str(seat["seat"]),
                occurred_at=start + timedelta(seconds=index),
            )
            await producer.event("drill.events", document)


async def _send_raw(bootstrap: str, value: bytes, key: str, headers: list[tuple[str, bytes]]):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("backout.rollbacks", value, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


@pytest.mark.e2e
def test_runbook(session: ShellSession) -> None:
    broken = session.cwd / "booking-refuses"
    bootstrap = f"127.0.0.1:{session.broker_port}"
    # What the page's first (not-run) block sets, for this machine.
    session.env["DRILL_BROKEN_FILE"] = str(broken)
    _start(session, "backout broker --port 9092")
    for line in (
        "export BACKOUT_BROKER=kafka://127.0.0.1:9092",
        "export BACKOUT_DATABASE_URL=sqlite+aiosqlite:///backout.db",
        "export BACKOUT_SAGAS=examples.shop.saga,tests.support.drill_saga",
        f"export BACKOUT_SIGNAL_KEY={SIGNAL_KEY} BACKOUT_API_TOKEN={API_TOKEN}",
        "export API=http://127.0.0.1:6066",
    ):
        session.run(line)
    _start(session, "backout worker --loglevel warning")
    session.run("python -m examples.shop.services all --broker 127.0.0.1:9092 --place-orders 5")
    session.wait(f"5 checkouts of {BAD}", lambda: _orders_tracked(session, BAD) >= 5)

    # Triggering: CLI (by deployment, then by service + version: nothing is redone).
    outputs: dict[str, str] = {}
    session.run_block(block("runbook-trigger-cli", RUNBOOK).text, _recorder(outputs))
    by_deployment = _output_of(outputs, "backout rollback --deployment")
    by_version = _output_of(outputs, "backout rollback --service")
    for output in (by_deployment, by_version):
        assert "completed_with_warnings" in output
        assert "15/15" in output

    # HTTP, with the bearer token; the worker signs the signal with its key.
    session.run_block(block("runbook-trigger-http", RUNBOOK).text, _recorder(outputs))
    accepted = json.loads(_output_of(outputs, "curl"))
    rollback_id = accepted["rollback_id"]
    assert accepted["status_url"] == f"/api/rollbacks/{rollback_id}"
    detail = session.wait_state(rollback_id, "completed_with_warnings")
    assert detail["signal"]["requested_by"] == "alice"

    # Status, three ways.
    session.env["ROLLBACK_ID"] = rollback_id
    outputs.clear()
    session.run_block(block("runbook-status", RUNBOOK).text, _recorder(outputs))
    assert rollback_id in outputs["backout status"]
    status = json.loads(_output_of(outputs, 'backout status "$ROLLBACK_ID"'))
    assert status["state"] == "completed_with_warnings"
    assert json.loads(_output_of(outputs, "curl"))["compensations_total"] == 15

    # Signed signals from wire-contract.md, against this worker (it has a key).
    script = session.cwd / "signed_rollback.py"
    script.write_text(session.adapt(block("sign-python", WIRE).text))
    result = subprocess.run(
        [sys.executable, str(script)], env=session.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    signed_id = result.stdout.strip()
    detail = session.wait_state(signed_id, "completed_with_warnings", "rejected")
    assert detail["state"] == "completed_with_warnings", detail["error"]
    assert detail["signal"]["requested_by"] == "deploy-bot"

    outputs.clear()
    session.run_block(block("sign-shell", WIRE).text, _recorder(outputs))
    value = session.env["VALUE"]
    assert _output_of(outputs, "echo").strip() == sign(value.encode(), SIGNAL_KEY)
    # What the kcat line sends: the same bytes and header.
    asyncio.run(
        _send_raw(
            bootstrap,
            value.encode(),
            BAD,
            [("backout-signature", session.env["SIGNATURE"].encode())],
        )
    )
    shell_id = json.loads(value)["signal_id"]
    assert session.wait_state(shell_id, "completed_with_warnings", "rejected")["state"] == (
        "completed_with_warnings"
    )

    # Failed compensations: two seats the booking service refuses to release.
    broken.touch()
    seats = [{"seat": "s1"}, {"seat": "s2", "broken": True}, {"seat": "s3", "broken": True}]
    asyncio.run(_produce_seats(bootstrap, DRILL, seats))
    session.wait(f"3 events of {DRILL}", lambda: _events_tracked(session, DRILL) >= 3)
    drill_id = session.run(f"backout rollback --deployment {DRILL} --reason drill").strip()
    detail = session.wait_state(drill_id, "failed")
    assert (detail["failed"], detail["applied"]) == (2, 1)
    failed = {c["idempotency_key"]: c for c in detail["compensations"] if c["state"] == "failed"}
    session.env["ROLLBACK_ID"] = drill_id
    outputs.clear()
    session.run_block(block("runbook-find-failed", RUNBOOK).text, _recorder(outputs))
    listing = _output_of(outputs, "curl")
    for key in failed:
        assert f"{key} failed SeatBooked" in listing
    assert "booking service refused to release seat" in listing
    assert "drill.events" in _output_of(outputs, "backout dlq list")

    # The booking service is fixed: retry one; release the other by hand and skip it.
    broken.unlink()
    retried, skipped = sorted(failed, key=lambda k: str(failed[k]["last_error"]))
    session.env["KEY"] = retried
    session.run_block(block("runbook-retry", RUNBOOK).text)
    session.wait(
        "the retried compensation to be applied",
        lambda: _state_of(session, drill_id, retried) == "applied",
    )
    session.env["KEY"] = skipped
    session.run_block(block("runbook-skip", RUNBOOK).text)
    detail = session.wait_state(drill_id, "completed")
    assert (detail["applied"], detail["skipped"], detail["failed"]) == (2, 1, 0)
    assert _compensation_of(detail, skipped)["skip_reason"].startswith("seat released by hand")

    # Pausing: one saga instance of 12 slow steps runs one step at a time.
    slow = [{"seat": f"p{n}", "delay": 0.5, "instance": "party-7"} for n in range(12)]
    asyncio.run(_produce_seats(bootstrap, SLOW, slow))
    session.wait(f"12 events of {SLOW}", lambda: _events_tracked(session, SLOW) >= 12)
    slow_id = session.run(f"backout rollback --deployment {SLOW} --reason drill").strip()
    session.env["ROLLBACK_ID"] = slow_id
    session.wait(
        "two steps applied",
        lambda: session.rollback(slow_id).get("applied", 0) >= 2,
    )
    session.run_block(block("runbook-pause", RUNBOOK).text)
    paused = session.wait_state(slow_id, "paused")
    session.wait(
        "the attempt in flight to finish", lambda: session.rollback(slow_id)["running"] == 0
    )
    applied = session.rollback(slow_id)["applied"]
    time.sleep(1.5)
    assert session.rollback(slow_id)["applied"] == applied, "a paused rollback started work"
    assert applied < 12, paused
    session.run_block(block("runbook-resume", RUNBOOK).text)
    done = session.wait_state(slow_id, "completed", timeout=60)
    assert done["planned"] == done["applied"] == 12

    # Game day.
    outputs.clear()
    session.run_block(block("runbook-drill", RUNBOOK).text, _recorder(outputs))
    runbook = (session.cwd / "rollback-orders-1.1-b2.md").read_text()
    assert runbook.startswith(f"# Rollback runbook: {BAD}")
    assert "## 3. Manual actions" in runbook
    assert "planned" in _output_of(outputs, "backout rollback")


def _compensation_of(detail: dict[str, Any], key: str) -> dict[str, Any]:
    [found] = [c for c in detail["compensations"] if c["idempotency_key"] == key]
    return found


def _state_of(session: ShellSession, rollback_id: str, key: str) -> str:
    return str(_compensation_of(session.rollback(rollback_id), key)["state"])


# ---------------------------------------------------------------- observability


def _tree_paths(text: str) -> list[tuple[str, ...]]:
    """Each line of a rendered tree as the path of labels from its root, minus
    what changes from run to run (durations); sorted, so sibling order is free."""
    paths: list[tuple[str, ...]] = []
    stack: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = re.match(r"^((?:│   |    )*(?:├── |└── ))?(.*)$", line)
        assert match is not None
        depth = len(match.group(1) or "") // 4
        label = re.sub(r"\s+\d+ ms$", "", match.group(2)).strip()
        del stack[depth:]
        stack.append(label)
        paths.append(tuple(stack))
    return sorted(paths)


@pytest.mark.e2e
def test_observability(session: ShellSession) -> None:
    _start(session, "backout broker --port 9092")
    _start(session, block("obs-worker", OBSERVABILITY).text)
    session.run_block(block("obs-shop", OBSERVABILITY).text)
    session.wait(f"one checkout of {BAD}", lambda: _orders_tracked(session, BAD) >= 1)

    outputs: dict[str, str] = {}
    session.run_block(block("obs-rollback", OBSERVABILITY).text, _recorder(outputs))
    assert "completed_with_warnings" in _output_of(outputs, "backout rollback")
    printed = _output_of(outputs, "python -m tests.support.span_tree")

    spans = span_tree.read_spans((session.cwd / "spans.jsonl").read_text().splitlines())
    by_id = {s.span_id: s for s in spans}
    [rollback] = [
        s
        for s in spans
        if s.name == "backout rollback" and s.attributes["backout.rollback_id"] == "traced-1"
    ]
    process = by_id[rollback.parent_id]
    assert process.name == "process backout.rollbacks"
    assert process.kind == "CONSUMER"
    # The CLI traced the signal it published: its producer span is the root.
    cli_send = by_id[process.parent_id]
    assert cli_send.name == "send backout.rollbacks"
    assert cli_send.kind == "PRODUCER"
    assert cli_send.parent_id is None
    [plan] = [s for s in spans if s.name == "backout plan" and s.parent_id == process.span_id]
    assert plan.attributes["backout.planned"] == 3
    compensations = [s for s in spans if s.name == "backout compensate"]
    assert len(compensations) == 3
    for compensate in compensations:
        assert compensate.parent_id == rollback.span_id
        assert compensate.trace_id == rollback.trace_id
        assert len(compensate.links) == 1, "a compensate span links to the event's span"
        [send] = [s for s in spans if s.parent_id == compensate.span_id]
        assert re.fullmatch(r"send \w+\.commands", send.name), send.name
        assert send.kind == "PRODUCER"
        [confirm] = [s for s in spans if s.parent_id == send.span_id]
        assert confirm.name == "backout confirm"
        assert confirm.links == [compensate.span_id]
    # The event spans the links point to live in the shop's traces, not in this one.
    assert {by_id.get(link) for c in compensations for link in c.links} == {None}

    # The page shows a tree of the same shape.
    documented = block("obs-tree", OBSERVABILITY).text
    assert _tree_paths(printed) == _tree_paths(documented), printed

    # Through the HTTP API the worker publishes the signal itself, under a producer span.
    session.http(
        "/api/rollbacks",
        method="POST",
        body={"deployment_id": BAD, "dry_run": True, "signal_id": "traced-2"},
    )
    session.wait_state("traced-2", "planned")
    session.wait(
        "the process span of traced-2",
        lambda: any(
            s.name == "backout plan" and s.attributes.get("backout.rollback_id") == "traced-2"
            for s in span_tree.read_spans((session.cwd / "spans.jsonl").read_text().splitlines())
        ),
    )
    spans = span_tree.read_spans((session.cwd / "spans.jsonl").read_text().splitlines())
    by_id = {s.span_id: s for s in spans}
    [plan2] = [
        s
        for s in spans
        if s.attributes.get("backout.rollback_id") == "traced-2" and s.name == "backout plan"
    ]
    process2 = by_id[plan2.parent_id]
    assert process2.name == "process backout.rollbacks"
    publisher = by_id[process2.parent_id]
    assert (publisher.name, publisher.kind) == ("send backout.rollbacks", "PRODUCER")

    # Metrics: every series the page lists is defined, and the live ones are served.
    outputs.clear()
    session.run_block(block("obs-metrics", OBSERVABILITY).text, _recorder(outputs))
    metrics_text = _output_of(outputs, "curl")
    documented_metrics = set(
        re.findall(r"^\| `(backout_\w+)` \|", OBSERVABILITY.read_text(), flags=re.MULTILINE)
    )
    assert documented_metrics == _defined_metrics()
    served = {re.split(r"[{ ]", line)[0] for line in metrics_text.splitlines()}
    for name in documented_metrics - {"backout_events_invalid_total"}:  # nothing was invalid
        assert any(s == name or s.startswith(f"{name}_") for s in served), name


def _defined_metrics() -> set[str]:
    """The metric families of consumers/metrics.py, as Prometheus exposes their names."""
    from prometheus_client import Counter

    from consumers import metrics

    names = set()
    for value in vars(metrics).values():
        if hasattr(value, "_name") and hasattr(value, "_type"):
            suffix = "_total" if isinstance(value, Counter) else ""
            names.add(f"{value._name}{suffix}")
    return names


def test_span_tree_draws_children_under_parents() -> None:
    def span(name: str, span_id: str, parent: str | None, start: int, **extra: Any) -> str:
        return json.dumps(
            {
                "name": name,
                "context": {"trace_id": "0x1", "span_id": span_id},
                "kind": extra.pop("kind", "SpanKind.INTERNAL"),
                "parent_id": parent,
                "start_time": f"2026-01-01T00:00:0{start}.000000Z",
                "end_time": f"2026-01-01T00:00:0{start}.005000Z",
                "status": {"status_code": "UNSET"},
                "attributes": extra,
                "links": [],
            }
        )

    lines = [
        span("backout compensate", "0xc", "0xr", 3, **{"backout.attempt": 1}),
        span("process backout.rollbacks", "0xp", None, 1, kind="SpanKind.CONSUMER"),
        span("backout rollback", "0xr", "0xp", 2),
        span("backout confirm", "0xf", "0xelsewhere", 4),
    ]
    spans = span_tree.read_spans(lines)
    text = span_tree.render(span_tree.build_trees(spans))
    assert text.splitlines() == [
        "process backout.rollbacks  [consumer]  5 ms",
        "└── backout rollback  5 ms",
        "    └── backout compensate  attempt 1  5 ms",
        "backout confirm  5 ms  (parent in another process)",
    ]


# ---------------------------------------------------------------------- changelog


def test_changelog_keeps_an_unreleased_section() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog")
    assert "## [Unreleased]" in text
    assert "keepachangelog.com" in text


# -------------------------------------------------------------------------- links

MY_PAGES = (
    QUICKSTART,
    DOCS / "concepts.md",
    SAGA_AUTHORING,
    WIRE,
    RUNBOOK,
    OBSERVABILITY,
    CONFIGURATION,
    ROOT / "CHANGELOG.md",
)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
        anchors.add(slug.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", MY_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        missing_heading = bool(anchor) and resolved.suffix == ".md"
        if not resolved.exists() or (missing_heading and anchor not in _anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
