"""Every `backout` command: `--help` with an example, its happy path, its main
error path (clear message, non-zero exit, no traceback unless `--debug`).

Commands run as subprocesses, as an operator would run them, against the
session's real broker and a real SQLite ledger prepared with the engine.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from sagas import CompensationContext, PermanentError, Saga
from sagas.engine import EngineSettings
from sagas.testing import SagaTestHarness
from schemas import RollbackState, RollbackStatus, utc_now
from schemas.dlq import DeadLetter
from tests.support.kafka import read_topic
from tests.support.worker import backout_command, subprocess_env

COMMANDS = [
    ["broker"],
    ["worker"],
    ["rollback"],
    ["status"],
    ["plan"],
    ["deployments"],
    ["retry"],
    ["skip"],
    ["pause"],
    ["resume"],
    ["retire"],
    ["demo"],
    ["dlq", "list"],
    ["dlq", "replay"],
    ["schemas", "export"],
]

cli_saga = Saga("cli")


@cli_saga.compensate("Placed")
async def cancel(event: dict[str, Any], ctx: CompensationContext) -> None:
    if event.get("broken"):
        raise PermanentError("orders service refuses")
    await ctx.send("cli.orders.commands", {"cancel": event["id"]})


cli_saga.irreversible("Mailed", action="Write to the customer")


def backout(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        backout_command(*args),
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str) -> dict[str, str]:
    return {
        "BACKOUT_BROKER": f"kafka://{kafka_bootstrap}",
        "BACKOUT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
        "BACKOUT_SAGAS": "tests.integration.test_cli",
        "BACKOUT_TOPIC_PREFIX": f"cli-{uuid.uuid4().hex[:8]}.",
    }


@pytest.fixture
async def ledger_with_history(env: dict[str, str]) -> dict[str, str]:
    """A ledger with a completed rollback, a failed one and a running one.

    The harness's fake clock starts in January 2026, so the late-event
    quarantine is set long enough to still be open by the wall clock.
    """
    url = env["BACKOUT_DATABASE_URL"]
    async with SagaTestHarness(
        cli_saga,
        database_url=url,
        settings=EngineSettings(poll_interval=3600, quarantine_seconds=10 * 365 * 86400),
    ) as harness:
        good = harness.envelope("Placed", {"id": "o1"}, deployment_id="orders-2")
        mail = harness.envelope("Mailed", {}, deployment_id="orders-2")
        broken = harness.envelope("Placed", {"id": "o2", "broken": True}, deployment_id="orders-3")
        await harness.emit(good, mail, broken)
        done = await harness.rollback("orders-2")
        failed = await harness.rollback("orders-3")
        [item] = await harness.compensations(failed.rollback_id)
        # A rollback left running by a worker (the CLI only changes the ledger).
        await harness.ledger.create_rollback(
            "running-1",
            signal={},
            deployment_id="orders-2",
            dry_run=False,
            state="running",
            now=harness.clock.now(),
        )
    return {
        "done": done.rollback_id,
        "failed": failed.rollback_id,
        "failed_key": item.idempotency_key,
        "done_state": done.state,
    }


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    # In-process: --help runs no command body, so a subprocess per command
    # would only add interpreter start-ups.
    from typer.testing import CliRunner

    from consumers.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "Usage" in result.output


def test_rollback_prints_the_id_and_publishes_a_canonical_signal(
    env: dict[str, str], kafka_bootstrap: str
) -> None:
    result = backout(
        "rollback",
        "--deployment",
        "orders-9",
        "--reason",
        "5xx",
        "--no-cascade",
        "--signal-id",
        "cli-rb-1",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cli-rb-1"
    import asyncio

    [record] = asyncio.run(
        read_topic(kafka_bootstrap, env["BACKOUT_TOPIC_PREFIX"] + "rollbacks", what="the signal")
    )
    signal = json.loads(record.value or b"")
    assert signal["signal_id"] == "cli-rb-1"
    assert signal["cascade"] is False
    assert signal["requested_by"] == "cli"
    assert record.key == b"orders-9"
    assert record.value == json.dumps(signal, sort_keys=True, separators=(",", ":")).encode()


def test_rollback_errors(env: dict[str, str]) -> None:
    assert_clean_error(backout("rollback", env=env), "name the deployment")
    assert_clean_error(
        backout("rollback", "--deployment", "d", "--since", "yesterday", env=env), "--since"
    )
    unreachable = {**env, "BACKOUT_BROKER": "kafka://127.0.0.1:1"}
    assert_clean_error(
        backout("rollback", "--deployment", "d", env=unreachable), "cannot reach the broker"
    )
    debug = backout("--debug", "rollback", "--deployment", "d", env=unreachable)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["bogus"], "No such command 'bogus'"),
        (["rollback", "--bogus"], "No such option: --bogus"),
        (["dlq"], "Missing command"),
        (["retry"], "Missing argument 'key'"),
    ],
    ids=["command", "option", "subcommand", "argument"],
)
def test_a_mistyped_command_line_shows_the_usage(
    args: list[str], problem: str, env: dict[str, str]
) -> None:
    # Typer parses with its own copy of click: its usage errors once fell
    # through to "unexpected UsageError", exit 1, without the usage line.
    result = backout(*args, env=env)
    assert result.returncode == 2, result.stderr
    command = " ".join(a for a in args if not a.startswith("-") and a != "bogus")
    assert f"Usage: backout {command}".rstrip() in result.stderr
    assert problem in result.stderr
    assert "unexpected" not in result.stderr
    assert "Traceback" not in result.stderr


def test_status_closes_its_reader_when_the_broker_is_unreachable(env: dict[str, str]) -> None:
    result = backout("status", env={**env, "BACKOUT_BROKER": "kafka://127.0.0.1:1"})
    assert_clean_error(result, "cannot reach the broker")
    assert "Unclosed" not in result.stderr


async def test_status_reads_the_status_topic(env: dict[str, str], kafka_bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    status = RollbackStatus(
        rollback_id="cli-status-1",
        deployment_id="orders-9",
        state=RollbackState.COMPLETED,
        planned=3,
        applied=3,
        confirmed=3,
        updated_at=utc_now(),
    )
    await producer.send_and_wait(
        env["BACKOUT_TOPIC_PREFIX"] + "status",
        status.model_dump_json().encode(),
        key=b"cli-status-1",
    )
    await producer.stop()
    result = backout("status", "cli-status-1", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "completed"
    table = backout("status", env=env)
    assert "cli-status-1" in table.stdout
    assert "3/3" in table.stdout
    assert_clean_error(backout("status", "nope", env=env), "unknown rollback 'nope'")


def test_plan_in_three_formats(env: dict[str, str], ledger_with_history: dict[str, str]) -> None:
    table = backout("plan", "--deployment", "orders-2", env=env)
    assert table.returncode == 0, table.stderr
    assert "cli.cancel" in table.stdout
    assert "Write to the customer" in table.stdout
    plan = json.loads(
        backout("plan", "--deployment", "orders-2", "--format", "json", env=env).stdout
    )
    assert plan["compensations"] == 1
    assert [m["event_type"] for m in plan["manual_actions"]] == ["Mailed"]
    runbook = backout("plan", "--deployment", "orders-2", "--format", "markdown", env=env).stdout
    assert runbook.startswith("# Rollback runbook: orders-2")
    assert "- [ ] **Mailed**" in runbook
    assert_clean_error(backout("plan", "--deployment", "nope", env=env), "unknown deployment")
    assert_clean_error(
        backout("plan", "--deployment", "orders-2", "--format", "pdf", env=env), "--format"
    )


def test_deployments(env: dict[str, str], ledger_with_history: dict[str, str]) -> None:
    listed = json.loads(backout("deployments", "--format", "json", env=env).stdout)
    counts = {d["deployment_id"]: d["by_type"] for d in listed}
    assert counts["orders-2"] == {"Mailed v1": 1, "Placed v1": 1}
    assert "orders-3" in backout("deployments", env=env).stdout
    missing = {**env, "BACKOUT_DATABASE_URL": "sqlite+aiosqlite:////nonexistent/ledger.db"}
    assert_clean_error(backout("deployments", env=missing), "does not exist")


def test_retry_and_skip(env: dict[str, str], ledger_with_history: dict[str, str]) -> None:
    key, failed = ledger_with_history["failed_key"], ledger_with_history["failed"]
    retried = backout("retry", key, env=env)
    assert retried.returncode == 0, retried.stderr
    assert failed in retried.stdout  # the failed rollback resumes
    assert_clean_error(backout("retry", key, env=env), "it is pending")
    assert_clean_error(backout("skip", key, "--reason", " ", env=env), "needs --reason")
    skipped = backout("skip", key, "--reason", "refunded by hand (OPS-1)", env=env)
    assert skipped.returncode == 0, skipped.stderr
    assert_clean_error(backout("retry", "no-such-key", env=env), "unknown compensation")


def test_pause_resume_retire(env: dict[str, str], ledger_with_history: dict[str, str]) -> None:
    assert backout("pause", "running-1", env=env).returncode == 0
    assert_clean_error(backout("pause", "running-1", env=env), "not running")
    assert backout("resume", "running-1", env=env).returncode == 0
    assert_clean_error(
        backout("resume", ledger_with_history["done"], env=env), "not paused or failed"
    )
    assert_clean_error(backout("pause", "nope", env=env), "unknown rollback 'nope'")
    retired = backout("retire", "orders-2", env=env)
    assert retired.returncode == 0, retired.stderr
    assert ledger_with_history["done"] in retired.stdout
    assert "no rollback" in backout("retire", "orders-2", env=env).stdout


async def test_dlq_list_and_replay(env: dict[str, str], kafka_bootstrap: str) -> None:
    source = env["BACKOUT_TOPIC_PREFIX"] + "orders.events"
    letter = DeadLetter(
        error="record value is not JSON", source_topic=source, source_partition=0, source_offset=7
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    await producer.send_and_wait(
        env["BACKOUT_TOPIC_PREFIX"] + "dlq",
        b"not json",
        key=b"k1",
        headers=[("x-origin", b"svc"), *letter.headers()],
    )
    await producer.stop()

    listed = json.loads(backout("dlq", "list", "--format", "json", env=env).stdout)
    assert [(d["error"], d["source_offset"]) for d in listed] == [("record value is not JSON", 7)]
    assert "not JSON" in backout("dlq", "list", env=env).stdout
    assert (
        json.loads(backout("dlq", "list", "--match", "other", "--format", "json", env=env).stdout)
        == []
    )
    dry = backout("dlq", "replay", "--dry-run", env=env)
    assert "1 dead letter(s) would be replayed" in dry.stdout
    replayed = backout("dlq", "replay", "--source-topic", source, env=env)
    assert "replayed 1" in replayed.stdout
    [back] = await read_topic(kafka_bootstrap, source, what="the replayed record")
    assert back.value == b"not json"
    assert back.headers == (("x-origin", b"svc"),)  # Backout's own headers removed
    assert_clean_error(backout("dlq", "list", "--format", "xml", env=env), "--format")


def test_schemas_export(env: dict[str, str], tmp_path: Path) -> None:
    result = backout("schemas", "export", str(tmp_path / "schemas"), env=env)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "schemas").iterdir())
    assert names == [
        "event-envelope.schema.json",
        "rollback-signal.schema.json",
        "rollback-status.schema.json",
    ]
    envelope = json.loads((tmp_path / "schemas" / "event-envelope.schema.json").read_text())
    assert "deployment_id" in envelope["required"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clean_error(backout("schemas", "export", str(blocker / "x"), env=env))


def test_ledger_commands_refuse_a_database_that_is_no_ledger(
    env: dict[str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")  # exists, so only the missing schema can be the problem
    result = backout("deployments", env={**env, "BACKOUT_DATABASE_URL": f"sqlite:///{empty}"})
    assert_clean_error(result, "holds no Backout ledger", "no worker has run against it")
    assert result.returncode == 1


def test_an_unsupported_database_url_is_a_settings_error(env: dict[str, str]) -> None:
    result = backout("deployments", env={**env, "BACKOUT_DATABASE_URL": "mysql://root@db/x"})
    assert_clean_error(result, "BACKOUT_DATABASE_URL", "runs on SQLite or PostgreSQL")
    assert result.returncode == 2


def test_worker_names_the_ledger_it_cannot_open(env: dict[str, str]) -> None:
    # faust reports a start-up failure with its traceback; the error line must
    # still say which setting points where (the driver says only "Connect call failed").
    unreachable = {**env, "BACKOUT_DATABASE_URL": "postgresql://backout:secret@127.0.0.1:1/x"}
    result = backout("worker", env=unreachable, timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert (
        "cannot open the ledger postgresql+asyncpg://backout:***@127.0.0.1:1/x "
        "(BACKOUT_DATABASE_URL)"
    ) in output, output
    assert "secret" not in output


def test_worker_names_the_web_port_it_cannot_bind(env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = backout("worker", env={**env, "BACKOUT_WEB_PORT": str(port)}, timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert (
        f"cannot serve the HTTP API on 127.0.0.1:{port} (BACKOUT_WEB_HOST, BACKOUT_WEB_PORT)"
        in output
    ), output


def test_worker_refuses_a_broken_saga_module_clearly(env: dict[str, str]) -> None:
    broken = {**env, "BACKOUT_SAGAS": "tests.no_such_module"}
    assert_clean_error(
        backout("worker", env=broken, timeout=60),
        "cannot import saga module 'tests.no_such_module'",
    )


@pytest.mark.parametrize(
    ("otel", "needle"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not otlp"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "exports OTLP over http/protobuf only",
        ),
    ],
)
def test_worker_refuses_tracing_settings_it_cannot_honour(
    env: dict[str, str], otel: dict[str, str], needle: str
) -> None:
    assert_clean_error(backout("worker", env={**env, **otel}, timeout=60), needle)


def test_broker_refuses_a_taken_port(env: dict[str, str], kafka_bootstrap: str) -> None:
    port = kafka_bootstrap.rsplit(":", 1)[1]
    assert_clean_error(backout("broker", "--port", port, env=env), "already in use")
