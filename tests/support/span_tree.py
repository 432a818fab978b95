"""Print the spans of a console-exporter file as indented trees.

`OTEL_TRACES_EXPORTER=console` with `BACKOUT_TRACE_FILE=spans.jsonl` makes a
worker write one JSON span per line (`ReadableSpan.to_json`). This turns
such a file into one tree per trace, children under their parent in start
order, with the attributes that matter for a rollback::

    python -m tests.support.span_tree spans.jsonl
    python -m tests.support.span_tree spans.jsonl --rollback 3f2c9a0e-...

A span whose parent is not in the file (it lives in another process, e.g.
the service that sent a confirmation) is shown as a root marked
`(parent in another process)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# Attributes shown after a span's name, with the short label they get.
SHOWN_ATTRIBUTES = {
    "backout.event_type": "",
    "backout.attempt": "attempt ",
    "backout.outcome": "outcome=",
    "backout.planned": "planned=",
    "backout.dry_run": "dry_run=",
    "messaging.destination.partition.id": "partition=",
}


@dataclass
class Span:
    """One span of the file, with its children once the tree is built."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: str
    start: datetime
    end: datetime
    status: str
    attributes: dict[str, Any]
    links: list[str]
    children: list[Span] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Span:
        """A span from one line of the console exporter."""
        return cls(
            name=data["name"],
            trace_id=data["context"]["trace_id"],
            span_id=data["context"]["span_id"],
            parent_id=data.get("parent_id"),
            kind=str(data.get("kind", "")).removeprefix("SpanKind."),
            start=_time(data["start_time"]),
            end=_time(data["end_time"]),
            status=str(data.get("status", {}).get("status_code", "UNSET")),
            attributes=dict(data.get("attributes") or {}),
            links=[link["context"]["span_id"] for link in data.get("links") or []],
        )

    @property
    def milliseconds(self) -> float:
        """Duration in milliseconds."""
        return (self.end - self.start).total_seconds() * 1000

    def label(self) -> str:
        """The line shown for this span (without the tree drawing)."""
        parts = [self.name]
        if self.kind not in ("INTERNAL", ""):
            parts.append(f"[{self.kind.lower()}]")
        for name, prefix in SHOWN_ATTRIBUTES.items():
            if name in self.attributes:
                value = self.attributes[name]
                parts.append(f"{prefix}{str(value).lower() if isinstance(value, bool) else value}")
        if self.name == "backout rollback" and "backout.deployment_id" in self.attributes:
            parts.append(f"deployment={self.attributes['backout.deployment_id']}")
        if self.links:
            parts.append(f"links={len(self.links)}")
        if self.status == "ERROR":
            parts.append("ERROR")
        parts.append(f"{self.milliseconds:.0f} ms")
        return "  ".join(parts)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def read_spans(lines: Iterable[str]) -> list[Span]:
    """Parse JSON-lines spans (blank lines are skipped)."""
    return [Span.from_json(json.loads(line)) for line in lines if line.strip()]


def build_trees(spans: Sequence[Span]) -> list[Span]:
    """Link children to parents; returns the roots, oldest first."""
    by_id = {span.span_id: span for span in spans}
    roots = []
    for span in spans:
        parent = by_id.get(span.parent_id) if span.parent_id else None
        if parent is None:
            roots.append(span)
        else:
            parent.children.append(span)
    for span in spans:
        span.children.sort(key=lambda s: (s.start, s.name))
    return sorted(roots, key=lambda s: (s.start, s.name))


def select_rollback(roots: Sequence[Span], spans: Sequence[Span], rollback_id: str) -> list[Span]:
    """The roots of the traces in which some span carries `backout.rollback_id`."""
    traces = {s.trace_id for s in spans if s.attributes.get("backout.rollback_id") == rollback_id}
    return [root for root in roots if root.trace_id in traces]


def render(roots: Sequence[Span]) -> str:
    """The trees as text, one line per span, drawn with box characters."""
    lines: list[str] = []

    def walk(span: Span, prefix: str, last: bool, top: bool) -> None:
        if top:
            note = "  (parent in another process)" if span.parent_id else ""
            lines.append(span.label() + note)
            child_prefix = ""
        else:
            lines.append(prefix + ("└── " if last else "├── ") + span.label())
            child_prefix = prefix + ("    " if last else "│   ")
        for index, child in enumerate(span.children):
            walk(child, child_prefix, index == len(span.children) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tests.support.span_tree FILE [--rollback ID]`."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.span_tree",
        description="Print console-exporter spans (JSON lines) as trees.",
    )
    parser.add_argument("file", type=Path, help="spans file (BACKOUT_TRACE_FILE)")
    parser.add_argument("--rollback", help="only the traces of this rollback id")
    args = parser.parse_args(argv)
    spans = read_spans(args.file.read_text(encoding="utf-8").splitlines())
    roots = build_trees(spans)
    if args.rollback:
        roots = select_rollback(roots, spans, args.rollback)
    print(render(roots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
