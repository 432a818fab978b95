"""Results: medians with min/max, ratios measured in the same run, and the table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

SCENARIOS = ("tracking", "rollback", "memory", "peer")


@dataclass
class Row:
    """One line of the table: a metric of Backout, next to its baseline when it has one.

    `values[i]` and `baseline[i]` come from the same run; the ratio of each
    run is `values[i] / baseline[i]` (or its inverse when lower is better).
    """

    scenario: str
    case: str
    metric: str
    unit: str
    values: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_label: str = ""
    higher_is_better: bool = True
    target: float | None = None  # on the ratio when there is a baseline, else on the value
    target_label: str = ""
    note: str = ""

    @property
    def ratios(self) -> list[float]:
        pairs = zip(self.values, self.baseline, strict=False)
        if self.higher_is_better:
            return [v / b for v, b in pairs if b]
        return [b / v for v, b in pairs if v]

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.baseline:
            if not self.ratios:
                return None
            return statistics.median(self.ratios) >= self.target
        if not self.values:
            return None
        value = statistics.median(self.values)
        return value >= self.target if self.higher_is_better else value <= self.target

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratios"] = self.ratios
        data["met"] = self.met
        return data


def spread(values: Sequence[float], unit: str) -> str:
    """`median [min-max] unit`, compact."""
    if not values:
        return "—"
    median = statistics.median(values)
    text = _number(median)
    if len(values) > 1:
        text += f" [{_number(min(values))}-{_number(max(values))}]"
    return f"{text} {unit}".strip()


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio_text(row: Row) -> str:
    ratios = row.ratios
    if not ratios:
        return "—"
    text = f"{statistics.median(ratios):.2f}x"
    if len(ratios) > 1:
        text += f" [{min(ratios):.2f}-{max(ratios):.2f}]"
    return text


def met_text(row: Row) -> str:
    met = row.met
    if met is None:
        return "skipped" if row.target is not None and not row.values else "—"
    return "[green]yes[/]" if met else "[red]no[/]"


def table(rows: Sequence[Row], title: str) -> Table:
    """The results as a rich table."""
    out = Table(title=title, show_lines=False)
    for name, justify in (
        ("scenario", "left"),
        ("case", "left"),
        ("metric", "left"),
        ("Backout", "right"),
        ("baseline", "right"),
        ("ratio", "right"),
        ("target", "left"),
        ("met", "center"),
    ):
        out.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        baseline = ""
        if row.baseline:
            baseline = f"{spread(row.baseline, row.unit)} ({row.baseline_label})"
        out.add_row(
            row.scenario,
            row.case,
            row.metric,
            spread(row.values, row.unit) if row.values else (row.note or "—"),
            baseline,
            ratio_text(row),
            row.target_label,
            met_text(row),
        )
    return out


def print_report(rows: Sequence[Row], title: str, console: Console | None = None) -> None:
    console = console or Console(width=200)
    console.print(table(rows, title))
    for row in rows:
        if row.note and row.values:
            console.print(f"  note ({row.scenario}, {row.case}): {row.note}")
        elif row.note:
            console.print(f"  {row.scenario} {row.case}: {row.note}")


def markdown(rows: Sequence[Row]) -> str:
    """The results as a Markdown table (docs/benchmarks.md)."""
    lines = [
        "| scenario | case | metric | Backout | baseline | ratio | target | met |",
        "|---|---|---|--:|--:|--:|---|:-:|",
    ]
    for row in rows:
        baseline = ""
        if row.baseline:
            baseline = f"{spread(row.baseline, row.unit)} ({row.baseline_label})"
        value = spread(row.values, row.unit) if row.values else (row.note or "—")
        met = met_text(row).replace("[green]", "").replace("[red]", "").replace("[/]", "")
        lines.append(
            f"| {row.scenario} | {row.case} | {row.metric} | {value} | {baseline} "
            f"| {ratio_text(row)} | {row.target_label} | {met} |"
        )
    return "\n".join(lines)
