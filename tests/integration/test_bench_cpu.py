"""`python -m bench.cpu`: the in-process CPU yardstick runs on both ledgers and
reports what docs/benchmarks.md says it does.

Not a timed test: it checks that every rollback completed, every command
sent and, in the rollback workload, confirmed (the tool fails otherwise),
and that the figures it prints are consistent with one another, never how
large they are.
"""

from __future__ import annotations

import re

import pytest

from tests.support.worker import run_module

FIGURE = r"([0-9.]+) \[([0-9.]+)-([0-9.]+)\]"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("workload", "steps"), [("peer", 2), ("rollback", 4)])
def test_it_reports_cpu_per_compensation_on_both_ledgers(workload: str, steps: int) -> None:
    completed = run_module(
        "bench.cpu",
        f"--workload={workload}",
        "--database=both",
        "--instances=150",
        "--repeat=2",
        timeout=280,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    for label in ("SQLite", "PostgreSQL"):
        header = (
            f"{label}, {workload} workload, {150 * steps} compensations, 2 rollback(s), "
            "CPU per compensation"
        )
        assert header in completed.stdout, output
        section = completed.stdout.split(header, 1)[1]
        figures = {}
        for part in ("total", "planning", "running"):
            match = re.search(rf"{part} +{FIGURE} µs", section)
            assert match is not None, f"no {part} line for {label}:\n{output}"
            median, low, high = (float(g) for g in match.groups())
            assert 0 < low <= median <= high, match.group(0)
            figures[part] = median
        # Medians of sums are not sums of medians; with 2 runs each is a mean.
        assert figures["total"] == pytest.approx(
            figures["planning"] + figures["running"], rel=0.02, abs=0.2
        ), figures
        assert re.search(rf"wall +{FIGURE} s", section), section
