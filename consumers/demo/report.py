"""What the demo prints: timed steps, progress bars, the checks and the summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from consumers.demo.checks import Summary
from schemas import RollbackStatus


class Reporter:
    """Prints the demo's story on a rich console, each line stamped with elapsed time."""

    def __init__(self, console: Console | None = None) -> None:
        # Piped output (CI logs, tests) gets a wide console and no colours.
        self.console = console or Console(
            width=None if sys.stdout.isatty() else 120, highlight=False
        )
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        """One timed line."""
        self.console.print(f"[dim][{self.elapsed():5.1f}s][/] {text}", soft_wrap=True)

    def heading(self, text: str) -> None:
        """A step of the story."""
        self.console.print()
        self.say(f"[bold cyan]{text}[/]")

    def error(self, text: str) -> None:
        """A failure, in red."""
        self.console.print(f"[bold red]error:[/] {text}", soft_wrap=True)

    def timing(self, name: str, seconds: float) -> None:
        """Remember how long a phase took."""
        self.timings[name] = seconds

    @contextmanager
    def counter(self, description: str, total: int) -> Iterator[tuple[Progress, TaskID]]:
        """A progress bar of `total` things."""
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=self.console,
        ) as progress:
            yield progress, progress.add_task(description, total=total)

    @contextmanager
    def rollback_progress(self) -> Iterator[RollbackBars]:
        """Two bars fed by the status topic: compensations applied and confirmed."""
        with Progress(
            TextColumn("  {task.description:<10}"),
            BarColumn(),
            TextColumn("{task.completed:>5}/{task.total}"),
            TextColumn("[bold]{task.fields[state]}"),
            TimeElapsedColumn(),
            console=self.console,
        ) as progress:
            yield RollbackBars(progress)

    def summary(self, s: Summary) -> None:
        """The checks, the numbers and the timings."""
        self.console.print()
        for check in s.checks:
            mark = "[green]✔[/]" if check.ok else "[red]✘[/]"
            self.console.print(f"  {mark} {check.text}", soft_wrap=True)
        self.console.print()
        table = Table(title="Backout demo summary", title_justify="left", expand=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_column("expected", justify="right")
        st, m = s.status, s.measured
        rows = [
            ("checkouts through orders 1.0 (good)", s.good_orders, None),
            ("checkouts through orders 1.1 (bad)", s.bad_orders, None),
            ("events tracked before the alert", m.events_forward, None),
            ("events tracked in all (with confirmations)", m.events_total, None),
            ("rollback state", st.state.value, "completed_with_warnings"),
            ("compensations planned", st.planned, s.expected_compensations),
            ("compensations applied", st.applied, s.expected_compensations),
            ("compensations confirmed", st.confirmed, s.expected_compensations),
            ("compensations failed", st.failed, 0),
            ("manual actions (correction e-mails)", st.manual, s.expected_manual),
            ("uncovered events", st.uncovered, 0),
            ("dead-lettered records (backout.dlq)", m.dead_letters, 0),
            ("signal → rollback finished", _seconds(m.signal_to_completed), None),
            ("signal → shop consistent", _seconds(m.signal_to_consistent), None),
        ]
        for name, value, expected in rows:
            table.add_row(name, str(value), "" if expected is None else str(expected))
        self.console.print(table)
        self.console.print(f"  alert raised through: {m.alert_path}", soft_wrap=True)
        self.print_timings()
        if s.problems:
            self.console.print(f"\n[bold red]{len(s.problems)} problem(s):[/]")
            for problem in s.problems[:50]:
                self.console.print(f"  - {problem}", soft_wrap=True)
            if len(s.problems) > 50:
                self.console.print(f"  ... and {len(s.problems) - 50} more")

    def print_timings(self) -> None:
        """Timings of the phases so far."""
        if not self.timings:
            return
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.timings.items())
        self.console.print(f"  timings: {parts}; total {self.elapsed():.1f}s", soft_wrap=True)


class RollbackBars:
    """The rollback's progress bars, updated from status records."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.applied = progress.add_task("applied", total=None, state="waiting")
        self.confirmed = progress.add_task("confirmed", total=None, state="")
        self.last: RollbackStatus | None = None

    def show(self, status: RollbackStatus) -> None:
        """Reflect one status record."""
        self.last = status
        total = max(status.planned, 1) if status.planned else None
        self.progress.update(
            self.applied, total=total, completed=status.applied, state=status.state.value
        )
        self.progress.update(
            self.confirmed,
            total=total,
            completed=status.confirmed,
            state=f"{status.manual} manual" if status.manual else "",
        )


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}s"
