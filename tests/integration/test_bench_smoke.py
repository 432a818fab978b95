"""`python -m bench --quick`: the benchmark harness runs end to end and prints its table.

A smoke test, not a timed one: it asserts that every scenario produced its
row (tracking, rollback, memory, and peer, measured or skipped with the
reason), never a number. The full benchmark and its targets are in
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.worker import run_module, subprocess_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_the_quick_benchmark_prints_every_row(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    completed = run_module("bench", "--quick", "--json", str(results), timeout=840)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]

    table = completed.stdout
    assert "Backout benchmark (quick" in table, output[-6000:]
    for scenario in ("tracking", "rollback", "memory", "peer"):
        assert any(line.lstrip("│| ").startswith(scenario) for line in table.splitlines()), (
            f"no {scenario} row in:\n{table}"
        )
    rows = json.loads(results.read_text())["rows"]
    # Metric names are checked in the JSON results: the table may wrap them.
    metrics = {row["metric"] for row in rows}
    for metric in (
        "events/s into the ledger",
        "compensations/s (signal -> all applied)",
        "signal -> first compensation applied",
        "signal -> all confirmed",
        "worker peak RSS (VmHWM)",
        "compensations/s vs DBOS workflows",
    ):
        assert metric in metrics, f"no {metric!r} row in:\n{table}"
    by_case_metric = {(row["case"], row["metric"]): row["values"] for row in rows}
    for (case, metric), first in by_case_metric.items():
        if metric == "signal -> first compensation applied":
            last = by_case_metric[(case, "signal -> all applied")]
            assert all(f <= a for f, a in zip(first, last, strict=True)), (case, first, last)
    by_scenario = {row["scenario"] for row in rows}
    assert by_scenario == {"tracking", "rollback", "memory", "peer"}
    for row in rows:
        if row["note"] and not row["values"]:
            continue  # e.g. no DBOS virtualenv here: the row says why
        assert row["values"], f"row without a measurement: {row}"
        assert all(value > 0 for value in row["values"]), row
        if row["baseline_label"]:
            assert row["baseline"], row
            assert all(value > 0 for value in row["baseline"]), row


def test_the_benchmarks_page_gives_the_commands_this_test_runs() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "python -m bench --quick" in page
    assert "python -m bench\n" in page


def test_the_topic_reader_imports_nothing_but_aiokafka() -> None:
    # bench/peer_dbos.py imports consumers.topics from the DBOS virtualenv,
    # which has aiokafka but neither faust nor pydantic (croniter conflict);
    # the peer row is skipped where that venv is missing, so check it here.
    probe = (
        "import sys, consumers.topics; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'faust', 'mode', 'pydantic', 'sqlalchemy', 'sagas', 'schemas', 'examples'}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=subprocess_env({}),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert completed.stdout.strip() == "[]", completed.stdout + completed.stderr
