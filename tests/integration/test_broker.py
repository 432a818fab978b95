"""The embedded broker, the `backout broker` command and the database fixtures."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import consumers.broker
from consumers.broker import BrokerError, EmbeddedBroker, find_free_port
from consumers.topics import READER_SETTINGS
from tests.support.names import unique_name
from tests.support.waiting import wait_for

STOP_DEADLINE = 15.0


def _bind_succeeds(port: int) -> bool:
    """Bind the port like Tansu does (SO_REUSEADDR): True if nobody listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _cluster_brokers(bootstrap: str) -> list[str]:
    """Send a metadata request; return the brokers it lists."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await client.bootstrap()
        return [f"{b.host}:{b.port}" for b in client.cluster.brokers()]
    finally:
        await client.close()


@pytest.fixture
def broker_log(tmp_path: Path) -> Path:
    return tmp_path / "tansu.log"


def test_find_free_port_can_be_bound() -> None:
    port = find_free_port()
    assert 0 < port < 65536
    assert _bind_succeeds(port)


async def test_session_broker_round_trips_key_value_and_headers(kafka_bootstrap: str) -> None:
    topic = unique_name("roundtrip")
    headers = [
        ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("binary", bytes(range(256))),
        ("empty", b""),
        ("repeated", b"1"),
        ("repeated", b"2"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            topic, value=b'{"hello": "world"}', key=b"order-1", headers=headers
        )
    finally:
        await producer.stop()

    # Assign instead of joining a group: a group join is held for half the
    # session timeout on Tansu, and this test is about the record, not groups.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, **READER_SETTINGS)
    await consumer.start()
    try:
        tp = TopicPartition(topic, meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()

    assert record.key == b"order-1"
    assert record.value == b'{"hello": "world"}'
    assert list(record.headers) == headers


def test_broker_lifecycle_and_restart_on_same_port(broker_log: Path) -> None:
    broker = EmbeddedBroker(log_path=broker_log)
    with broker:
        assert broker.is_running
        assert broker.pid is not None
        pid = broker.pid
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        assert asyncio.run(_cluster_brokers(broker.bootstrap)) == [broker.bootstrap]
        assert not _bind_succeeds(broker.port)
    # stop() has reaped the process and freed the port.
    assert not broker.is_running
    assert _process_gone(pid)
    assert _bind_succeeds(broker.port)
    broker.stop()  # idempotent

    # The freed port can host a new broker at once (what a developer does
    # after Ctrl-C on `backout broker`).
    with EmbeddedBroker(port=broker.port) as again:
        assert asyncio.run(_cluster_brokers(again.bootstrap)) == [again.bootstrap]


def test_second_broker_on_same_port_is_refused(kafka_bootstrap: str, broker_log: Path) -> None:
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    second = EmbeddedBroker(port=port, log_path=broker_log)
    with pytest.raises(BrokerError, match="already in use"):
        second.start(timeout=10)
    assert second.pid is None  # refused before spawning anything
    # The session broker is unharmed.
    assert asyncio.run(_cluster_brokers(kafka_bootstrap)) == [kafka_bootstrap]


def test_taken_port_is_detected_even_if_the_pre_check_misses_it(
    kafka_bootstrap: str, broker_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate losing the race for the port: Tansu then 'starts', fails and
    exits 0 while the other broker answers our probe. That must not count as ready."""
    monkeypatch.setattr(consumers.broker, "_port_is_free", lambda host, port: True)
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    second = EmbeddedBroker(port=port, log_path=broker_log)
    with pytest.raises(BrokerError) as excinfo:
        second.start(timeout=10)
    assert "broker log" in str(excinfo.value)
    assert not second.is_running
    assert asyncio.run(_cluster_brokers(kafka_bootstrap)) == [kafka_bootstrap]


def test_port_taken_by_a_non_kafka_listener_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(BrokerError, match="already in use"):
            EmbeddedBroker(port=port).start(timeout=10)


def test_error_without_log_path_says_output_was_discarded() -> None:
    broker = EmbeddedBroker()
    assert "discarded" in broker.log_tail()


def _backout_command() -> list[str]:
    script = Path(sys.executable).with_name("backout")
    assert script.exists(), f"console script missing at {script}: run `pip install -e .`"
    return [str(script)]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_backout_broker_command_serves_and_stops_on_signal(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    port = find_free_port()
    bootstrap = f"127.0.0.1:{port}"
    out_path = tmp_path / "stdout.txt"
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *_backout_command(),
            "broker",
            "--port",
            str(port),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_for(
            lambda: proc.returncode is not None or bootstrap in out_path.read_text(),
            timeout=60,
            message="`backout broker` to print its bootstrap address",
        )
        assert proc.returncode is None, out_path.read_text()
        assert await _cluster_brokers(bootstrap) == [bootstrap]

        proc.send_signal(stop_signal)
        code = await asyncio.wait_for(proc.wait(), STOP_DEADLINE)
        assert code == 0, out_path.read_text()
        # The broker child was stopped and reaped, not orphaned.
        assert _bind_succeeds(port), "port still held after `backout broker` exited"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_backout_broker_command_fails_on_taken_port(kafka_bootstrap: str) -> None:
    port = kafka_bootstrap.rsplit(":", 1)[1]
    result = subprocess.run(
        [*_backout_command(), "broker", "--port", port],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "already in use" in result.stderr


# ---------------------------------------------------------------- database fixtures


@pytest.mark.postgres
async def test_postgres_database_fixture_is_a_live_throwaway_database(
    postgres_database: str,
) -> None:
    assert postgres_database.startswith("postgresql+asyncpg://")
    name = postgres_database.rsplit("/", 1)[1]
    assert name.startswith("backout_test_")
    conn = await asyncpg.connect(postgres_database.replace("+asyncpg", "", 1))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == name
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_fresh_pg_url_is_empty_and_separate(
    fresh_pg_url: str, postgres_database: str
) -> None:
    assert fresh_pg_url != postgres_database
    conn = await asyncpg.connect(fresh_pg_url.replace("+asyncpg", "", 1))
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
    finally:
        await conn.close()


async def test_ledger_url_works_with_sqlalchemy(ledger_url: str) -> None:
    engine = create_async_engine(ledger_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO probe (id) VALUES (1)"))
            assert (await conn.execute(text("SELECT count(*) FROM probe"))).scalar_one() == 1
    finally:
        await engine.dispose()
