"""Security: signed signals, the API token, the blast-radius guard, where code comes from.

DESIGN §2.2 (signed signals: with `BACKOUT_SIGNAL_KEY` set a signal needs
`backout-signature: sha256=<HMAC of the record value bytes>`; Backout's own
publishers sign the canonical JSON), §2.4/§2.5 (a rejected signal gets a
`rejected` status and a DLQ record), §4 (the blast-radius guard), §5
(mutating endpoints need the bearer token) and §3 (saga modules come from
`BACKOUT_SAGAS` / entry points only, never from a message).

One worker for the module (SQLite; nothing here depends on the backend),
with a signing key, an API token, a guard of 3 compensations, and a
marker-writing module importable on its PYTHONPATH but not configured.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.dlq import (
    ERROR_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from schemas.signal import SIGNATURE_HEADER, RollbackSignal, sign
from tests.reliability.conftest import report
from tests.support.kafka import Record, read_topic
from tests.support.nasty import Events, Nasty, Sent, Target, produce, read_until, start_target
from tests.support.nasty import wait_tracked as wait_ledger
from tests.support.sync import run_sync
from tests.support.worker import subprocess_env

pytestmark = pytest.mark.e2e

KEY = "reliability-signal-key-" + uuid.uuid4().hex
TOKEN = "reliability-api-token-" + uuid.uuid4().hex
GUARD = 3
REPO = Path(__file__).resolve().parents[2]


class Secured:
    """The module's worker, and the marker module it must never import."""

    def __init__(self, target: Target, marker_module: str, marker_file: Path, pythonpath: str):
        self.target = target
        self.marker_module = marker_module
        self.marker_file = marker_file
        self.pythonpath = pythonpath
        self.refused_ids: set[str] = set()


@pytest.fixture(scope="module")
def secured(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("security")
    modules = root / "modules"
    modules.mkdir()
    marker_module = f"backout_marker_{uuid.uuid4().hex[:12]}"
    marker_file = root / "IMPORTED"
    # Importable, and shaped like a real saga module: if anything ever
    # imported it, the marker file would say so.
    (modules / f"{marker_module}.py").write_text(
        "from pathlib import Path\n"
        "from sagas import Saga\n"
        f"Path({str(marker_file)!r}).write_text('imported by ' + __name__)\n"
        "evil = Saga('evil')\n"
        "evil.ignore('Anything')\n"
    )
    pythonpath = f"{REPO}:{modules}"
    target = run_sync(
        start_target(
            kafka_bootstrap,
            f"sqlite+aiosqlite:///{root / 'ledger.db'}",
            root,
            BACKOUT_SIGNAL_KEY=KEY,
            BACKOUT_API_TOKEN=TOKEN,
            BACKOUT_MAX_COMPENSATIONS=str(GUARD),
            PYTHONPATH=pythonpath,
        )
    )
    try:
        yield Secured(target, marker_module, marker_file, pythonpath)
    finally:
        code = target.worker.stop_sync()
        assert code == 0, f"worker exited with {code}\n{target.worker.log_tail()}"


# ---------------------------------------------------------------------- helpers


def _signal(deployment: str, signal_id: str | None = None, **fields: Any) -> RollbackSignal:
    return RollbackSignal.model_validate(
        {
            "signal_id": signal_id or f"sec-{uuid.uuid4().hex}",
            "deployment_id": deployment,
            "issued_at": datetime.now(UTC).isoformat(),
            "reason": "security test",
            **fields,
        }
    )


def _record(
    signal: RollbackSignal,
    kind: str,
    *,
    value: bytes | None = None,
    signature: bytes | str | None = "sign",
    key: str = KEY,
) -> Nasty:
    """A signal record: canonical bytes signed with `key`, unless told otherwise."""
    raw = signal.canonical_bytes() if value is None else value
    headers: list[tuple[str, bytes]] = []
    if signature == "sign":
        headers.append((SIGNATURE_HEADER, sign(raw, key).encode()))
    elif isinstance(signature, bytes):
        headers.append((SIGNATURE_HEADER, signature))
    return Nasty(kind, raw, key=signal.record_key.encode(), headers=tuple(headers))


async def _events(target: Target, deployment: str, count: int) -> list[str]:
    """`count` Reserved events of `deployment` (compensated without confirmation), tracked."""
    ev = Events(f"{target.tag}-{uuid.uuid4().hex[:8]}", random.Random(0))
    records = [
        ev.good("reserved", ev.document("Reserved", deployment_id=deployment)) for _ in range(count)
    ]
    await produce(target.bootstrap, [(target.events_topic("stock"), r) for r in records])
    ids = [r.event_id or "" for r in records]
    await wait_ledger(target, ids, timeout=30)
    return ids


def _of(records: list[Record], rollback_id: str) -> list[dict[str, Any]]:
    return [r.json() for r in records if r.json()["rollback_id"] == rollback_id]


async def _until_state(target: Target, rollback_id: str, states: set[str]) -> list[dict[str, Any]]:
    """Every status of `rollback_id` up to the first in `states`."""
    records = await read_until(
        target.bootstrap,
        target.status_topic,
        lambda rs: any(s["state"] in states for s in _of(rs, rollback_id)),
        timeout=60,
        what=lambda rs: f"{rollback_id} never reached {states}: {_of(rs, rollback_id)}",
    )
    return _of(records, rollback_id)


async def _dead_letters(target: Target, sent: list[Sent]) -> dict[int, Record]:
    """The DLQ records of `sent` signal records, by source offset."""
    wanted = {(s.partition, s.offset) for s in sent}

    def source(record: Record) -> tuple[int, int] | None:
        if record.header(SOURCE_TOPIC_HEADER) != target.signals_topic:
            return None
        partition = int(record.header(SOURCE_PARTITION_HEADER) or -1)
        return partition, int(record.header(SOURCE_OFFSET_HEADER) or -1)

    found = await read_until(
        target.bootstrap,
        target.dlq_topic,
        lambda rs: wanted <= {source(r) for r in rs},
        timeout=30,
        what=lambda rs: f"dead letters for {wanted - {source(r) for r in rs}}",
    )
    return {where[1]: r for r in found if (where := source(r)) in wanted}


def _http(
    target: Target, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        target.worker.base_url + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def http(target: Target, method: str, path: str, body: Any = None, **headers: str) -> Any:
    """(status, JSON body) of one request to the worker's API."""
    return await asyncio.to_thread(_http, target, method, path, body, headers)


# ------------------------------------------------------------------------ tests


async def test_unsigned_or_forged_signals_are_rejected_and_do_not_block_the_real_one(
    secured: Secured,
) -> None:
    target = secured.target
    deployment = f"{target.tag}-orders-6.6"
    ids = await _events(target, deployment, 2)
    signal = _signal(deployment)
    tampered = json.loads(signal.canonical_bytes())
    tampered["force"] = True
    other = _signal(deployment)
    forged = [
        _record(signal, "unsigned", signature=None),
        _record(signal, "wrong key", key="not-the-key"),
        _record(signal, "empty header", signature=b""),
        _record(signal, "sha1 prefix", signature=b"sha1=" + sign(b"x", KEY)[7:].encode()),
        _record(signal, "not hex", signature=b"sha256=zzzz"),
        _record(
            signal, "uppercase hex", signature=sign(signal.canonical_bytes(), KEY).upper().encode()
        ),
        # Signed, then altered: the HMAC covers the bytes exactly as sent.
        _record(
            signal,
            "altered after signing",
            value=json.dumps(tampered, sort_keys=True, separators=(",", ":")).encode(),
            signature=sign(signal.canonical_bytes(), KEY).encode(),
        ),
        # Another signal's valid signature, replayed onto this one.
        _record(
            signal, "borrowed signature", signature=sign(other.canonical_bytes(), KEY).encode()
        ),
        # Signed with the key as bytes of another encoding of the key text.
        _record(signal, "key with a newline", key=KEY + "\n"),
    ]
    sent = await produce(target.bootstrap, [(target.signals_topic, r) for r in forged])
    real = await produce(target.bootstrap, [(target.signals_topic, _record(signal, "valid"))])

    statuses = await _until_state(target, signal.signal_id, {"completed", "failed"})
    states = [s["state"] for s in statuses]
    rejected = [s for s in statuses if s["state"] == "rejected"]
    assert len(rejected) == len(forged), states
    assert all("backout-signature" in (s["error"] or "") for s in rejected), rejected
    assert states[len(forged) :][0] == "accepted", states
    assert statuses[-1]["state"] == "completed", statuses[-1]
    assert (statuses[-1]["planned"], statuses[-1]["applied"]) == (2, 2)

    letters = await _dead_letters(target, sent)
    assert sorted(letters) == sorted(s.offset for s in sent)
    for s in sent:
        letter = letters[s.offset]
        assert letter.value == s.record.value, s.record.kind
        error = letter.header(ERROR_HEADER) or ""
        assert error.startswith("rejected signal: "), error
        assert "backout-signature" in error, error
    commands = await read_topic(
        target.bootstrap,
        target.command_topic("stock"),
        lambda r: r.rollback_id == signal.signal_id,
        count=2,
    )
    assert sorted(c.compensates or "" for c in commands) == sorted(ids)
    assert real[0].offset > max(s.offset for s in sent)

    # Replaying the valid signed record (captured off the topic) changes nothing:
    # same id, one rollback. A signed dry run behind it (same key, same
    # partition) proves the worker has read the replay.
    behind = _signal(deployment, dry_run=True)
    await produce(
        target.bootstrap,
        [
            (target.signals_topic, _record(signal, "replayed")),
            (target.signals_topic, _record(behind, "behind")),
        ],
    )
    await _until_state(target, behind.signal_id, {"planned"})
    replayed = await _until_state(target, signal.signal_id, {"completed"})
    assert [s["state"] for s in replayed].count("accepted") == 1
    assert len(await _until_state(target, signal.signal_id, {"completed"})) == len(statuses)
    report(
        f"security: {len(forged)} forged/unsigned signals with one signal_id -> {len(rejected)} "
        f"rejected statuses + {len(letters)} dead letters; the valid one after them -> "
        f"{statuses[-1]['state']} ({statuses[-1]['applied']}/{statuses[-1]['planned']}); "
        "its replay -> nothing"
    )


async def test_the_api_refuses_a_signal_the_ledger_could_not_store(secured: Secured) -> None:
    """NUL in a text field: 400 from the API (PostgreSQL cannot store it; a worker that
    received such a signal would reject it, see test_fuzz)."""
    target = secured.target
    for body in (  # json.dumps writes the NUL as the escape \u0000
        {"deployment_id": "orders\x00"},
        {"deployment_id": "orders", "signal_id": "id\x00"},
        {"deployment_id": "orders", "reason": "\x00"},
    ):
        status, answer = await http(
            target, "POST", "/api/rollbacks", body, Authorization=f"Bearer {TOKEN}"
        )
        assert status == 400, answer
        assert "NUL" in answer["error"], answer


async def test_the_signature_covers_the_bytes_as_sent_not_a_re_serialisation(
    secured: Secured,
) -> None:
    """A correctly signed, non-canonical encoding is accepted (DESIGN: the HMAC is of the
    record value bytes exactly as sent)."""
    target = secured.target
    deployment = f"{target.tag}-orders-6.7"
    await _events(target, deployment, 1)
    signal = _signal(deployment, dry_run=True)
    pretty = json.dumps(json.loads(signal.canonical_bytes()), indent=3).encode()
    await produce(
        target.bootstrap,
        [
            (
                target.signals_topic,
                _record(signal, "pretty", value=pretty, signature=sign(pretty, KEY).encode()),
            )
        ],
    )
    statuses = await _until_state(target, signal.signal_id, {"planned", "rejected"})
    assert statuses[-1]["state"] == "planned", statuses[-1]


async def test_the_cli_and_the_http_api_sign_what_they_publish(secured: Secured) -> None:
    target = secured.target
    by_cli, by_api, by_bad_cli = (f"{target.tag}-orders-7.{n}" for n in range(3))
    for deployment in (by_cli, by_api, by_bad_cli):
        await _events(target, deployment, 1)
    env = {**target.env, "PYTHONPATH": secured.pythonpath}

    cli_id = f"cli-{uuid.uuid4().hex}"
    result = await _cli(env, "rollback", "--deployment", by_cli, "--signal-id", cli_id, "--wait")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "completed" in result.stdout

    # The same CLI with another key: the worker refuses what it signed.
    bad_id = f"cli-badkey-{uuid.uuid4().hex}"
    result = await _cli(
        {**env, "BACKOUT_SIGNAL_KEY": "someone-elses-key"},
        "rollback",
        "--deployment",
        by_bad_cli,
        "--signal-id",
        bad_id,
        "--wait",
    )
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}"
    statuses = await _until_state(target, bad_id, {"rejected"})
    assert "backout-signature" in (statuses[-1]["error"] or "")

    api_id = f"api-{uuid.uuid4().hex}"
    status, body = await http(
        target,
        "POST",
        "/api/rollbacks",
        {"deployment_id": by_api, "signal_id": api_id},
        Authorization=f"Bearer {TOKEN}",
    )
    assert status == 202, body
    statuses = await _until_state(target, api_id, {"completed", "failed", "rejected"})
    assert statuses[-1]["state"] == "completed", statuses[-1]

    # What both published: canonical JSON, signed with the key over those bytes.
    published = await read_topic(
        target.bootstrap,
        target.signals_topic,
        lambda r: r.value is not None and json.loads(r.value).get("signal_id") in (cli_id, api_id),
        count=2,
    )
    for record in published:
        assert record.value is not None
        signal = RollbackSignal.model_validate_json(record.value)
        assert record.value == signal.canonical_bytes(), record
        assert record.header(SIGNATURE_HEADER) == sign(record.value, KEY), record
    report(
        "security: `backout rollback` and POST /api/rollbacks publish canonical, signed signals "
        "(both completed); the CLI with a wrong key -> rejected"
    )


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # `run_cli` would put the repo alone on PYTHONPATH: keep ours.
    process = await asyncio.create_subprocess_exec(
        *_backout(*args, "--timeout", "60"),
        env={**subprocess_env(env), "PYTHONPATH": env["PYTHONPATH"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


def _backout(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("backout")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from consumers.cli import main; main()", *args]


async def test_mutating_endpoints_refuse_requests_without_the_bearer_token(
    secured: Secured,
) -> None:
    target = secured.target
    deployment = f"{target.tag}-orders-8.0"
    await _events(target, deployment, 1)
    rollback_id = f"auth-{uuid.uuid4().hex}"
    status, _ = await http(
        target,
        "POST",
        "/api/rollbacks",
        {"deployment_id": deployment, "signal_id": rollback_id},
        Authorization=f"Bearer {TOKEN}",
    )
    assert status == 202
    done = await _until_state(target, rollback_id, {"completed"})
    detail = await target.worker.get(f"/api/rollbacks/{rollback_id}")
    key = detail["compensations"][0]["idempotency_key"]

    refused_id = f"refused-{uuid.uuid4().hex}"
    secured.refused_ids.add(refused_id)
    alert = {
        "version": "4",
        "status": "firing",
        "alerts": [{"status": "firing", "labels": {"deployment_id": deployment}}],
    }
    calls = [
        ("/api/rollbacks", {"deployment_id": deployment, "signal_id": refused_id}),
        (f"/api/rollbacks/{rollback_id}/pause", None),
        (f"/api/rollbacks/{rollback_id}/resume", None),
        (f"/api/compensations/{key}/retry", None),
        (f"/api/compensations/{key}/skip", {"reason": "let me in"}),
        ("/api/alertmanager", alert),
        ("/api/flagger", {"name": "orders", "namespace": "shop", "phase": "Failed"}),
        (
            "/api/argo-rollouts",
            {"event": "RolloutAborted", "rollout": "orders", "deployment_id": deployment},
        ),
    ]
    bad_credentials: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
        {"X-Api-Token": TOKEN},
    ]
    answers: collections.Counter[int] = collections.Counter()
    for path, body in calls:
        for credentials in bad_credentials:
            status, answer = await http(
                target, "POST", path, body if body is not None else {}, **credentials
            )
            answers[status] += 1
            assert status == 401, f"POST {path} with {credentials}: {status} {answer}"
            assert "token" in answer["error"], answer
        status, answer = await http(target, "POST", f"{path}?token={TOKEN}", body or {})
        assert status == 401, f"POST {path}?token=...: {status} {answer}"
        answers[status] += 1

    # Nothing happened: the rollback and its compensation are as they were,
    # and the reads stay open.
    after = await target.worker.get(f"/api/rollbacks/{rollback_id}")
    assert after["state"] == done[-1]["state"] == "completed"
    assert after["compensations"][0]["state"] == detail["compensations"][0]["state"]
    assert after["compensations"][0]["skip_reason"] is None
    for path in ("/health", "/api/deployments", "/api/rollbacks", f"/api/rollbacks/{rollback_id}"):
        assert (await target.worker.fetch(path))[0] == 200, path
    status, _ = await target.worker.fetch(f"/api/rollbacks/{refused_id}")
    assert status == 404
    report(
        f"security: {sum(answers.values())} mutating requests without the right bearer token "
        f"over {len(calls)} endpoints -> {dict(answers)}; nothing changed"
    )


async def test_the_blast_radius_guard_rejects_large_rollbacks_unless_forced(
    secured: Secured,
) -> None:
    target = secured.target
    large, at_limit = f"{target.tag}-orders-9.0", f"{target.tag}-orders-9.1"
    large_ids = await _events(target, large, GUARD + 2)
    await _events(target, at_limit, GUARD)

    over = _signal(large)
    sent = await produce(target.bootstrap, [(target.signals_topic, _record(over, "over"))])
    statuses = await _until_state(target, over.signal_id, {"rejected", "completed", "running"})
    assert statuses[-1]["state"] == "rejected", statuses[-1]
    assert "BACKOUT_MAX_COMPENSATIONS" in statuses[-1]["error"], statuses[-1]
    letters = await _dead_letters(target, sent)
    assert "BACKOUT_MAX_COMPENSATIONS" in (letters[sent[0].offset].header(ERROR_HEADER) or "")

    exact = _signal(at_limit)
    forced = _signal(large, force=True)
    await produce(
        target.bootstrap,
        [
            (target.signals_topic, _record(exact, "at limit")),
            (target.signals_topic, _record(forced, "forced")),
        ],
    )
    for signal, size in ((exact, GUARD), (forced, GUARD + 2)):
        statuses = await _until_state(target, signal.signal_id, {"rejected", "completed", "failed"})
        assert statuses[-1]["state"] == "completed", statuses[-1]
        assert statuses[-1]["applied"] == size

    # Nothing was sent for the refused signal; everything for the forced one.
    commands = await read_topic(
        target.bootstrap,
        target.command_topic("stock"),
        lambda r: r.rollback_id in (over.signal_id, forced.signal_id),
        count=len(large_ids),
    )
    assert {c.rollback_id for c in commands} == {forced.signal_id}
    assert sorted(c.compensates or "" for c in commands) == sorted(large_ids)
    report(
        f"security: guard {GUARD}: {GUARD + 2} compensations -> rejected (+DLQ); {GUARD} -> "
        f"completed; {GUARD + 2} with force -> completed, {len(commands)} commands"
    )


async def test_saga_modules_are_never_imported_from_message_content(secured: Secured) -> None:
    target = secured.target
    module = secured.marker_module
    names = [module, f"{module}:evil", f"{module}.evil", "os", "os:system", "subprocess"]
    ev = Events(f"{target.tag}-{uuid.uuid4().hex[:8]}", random.Random(1))
    deployment = f"{target.tag}-orders-10.0"

    events: list[Nasty] = []
    for name in names:
        # As an event type (unknown: dead-lettered), as a payload of a known
        # type (tracked), as envelope fields, as headers.
        events.append(ev.bad("module/event-type", ev.document(name, deployment_id=deployment)))
        events.append(
            ev.good(
                "module/payload",
                ev.document(
                    "Reserved",
                    deployment_id=deployment,
                    payload={"order_id": name, "saga": name, "sagas": name, "__import__": name},
                    sagas=name,
                    saga_module=name,
                ),
                [("backout-saga", name.encode()), ("BACKOUT_SAGAS", name.encode())],
            )
        )
    await produce(target.bootstrap, [(target.events_topic("orders"), r) for r in events])
    await wait_ledger(target, [r.event_id or "" for r in events if r.good], timeout=30)

    signals = []
    for name in names:
        signals.append(_signal(name, reason=name, requested_by=name))
        signals.append(_signal(deployment, reason=name, dry_run=True))
    unknown_fields = json.loads(_signal(deployment, dry_run=True).canonical_bytes())
    unknown_fields.update({"sagas": names, "saga": module, "module": module, "import": module})
    raw = json.dumps(unknown_fields).encode()
    records = [_record(s, "module/signal") for s in signals]
    records.append(
        Nasty("module/extra-fields", raw, headers=((SIGNATURE_HEADER, sign(raw, KEY).encode()),))
    )
    await produce(target.bootstrap, [(target.signals_topic, r) for r in records])
    for signal in [*signals, RollbackSignal.model_validate(unknown_fields)]:
        await _until_state(target, signal.signal_id, {"planned", "rejected", "completed"})
    status, body = await http(
        target,
        "POST",
        "/api/rollbacks",
        {"deployment_id": module, "sagas": module, "saga": module, "dry_run": True},
        Authorization=f"Bearer {TOKEN}",
    )
    assert status == 202, body
    await _until_state(target, body["rollback_id"], {"rejected"})

    assert target.worker.running
    assert not secured.marker_file.exists(), secured.marker_file.read_text()

    # The control: the module *is* importable by a worker's interpreter, and
    # loading it as a configured saga module writes the marker.
    control = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            f"from sagas.registry import load_registry; load_registry([{module!r}])",
        ],
        env={**subprocess_env({}), "PYTHONPATH": secured.pythonpath},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert control.returncode == 0, control.stderr
    assert secured.marker_file.read_text() == f"imported by {module}"
    report(
        f"security: {len(events)} events and {len(records) + 1} signals/requests naming modules "
        f"({', '.join(names)}) -> marker module never imported (control import writes it)"
    )


async def test_refused_requests_published_nothing(secured: Secured) -> None:
    """Runs last in the module: no record on the signals topic carries a refused id."""
    target = secured.target
    found = await _all_signals(target)
    carried = {
        json.loads(r.value).get("signal_id") for r in found if r.value and r.value.startswith(b"{")
    }
    assert not secured.refused_ids & carried


async def _all_signals(target: Target) -> list[Record]:
    seen: list[Record] = []

    def keep(record: Record) -> bool:
        seen.append(record)
        return False

    with contextlib.suppress(AssertionError):  # read to the deadline on purpose
        await read_topic(target.bootstrap, target.signals_topic, keep, timeout=3)
    return seen
