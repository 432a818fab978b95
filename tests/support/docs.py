"""Reading the code blocks of README.md and docs/ for the docs tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# (file relative to the repo, block name) of every block a docs test runs.
TESTED_BLOCKS: set[tuple[str, str | None]] = set()
_MARKER = re.compile(r"<!--\s*docs-(test|not-run):\s*(.*?)\s*-->")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block and the marker comment right above it, if any."""

    path: Path
    line: int
    language: str
    text: str
    marker: str | None  # "test" | "not-run"
    label: str | None  # the test name, or the reason it is not run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def documentation_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def code_blocks(path: Path) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown file."""
    blocks: list[CodeBlock] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    pending: tuple[str, str] | None = None
    while index < len(lines):
        line = lines[index]
        marker = _MARKER.search(line)
        if marker:
            pending = (marker.group(1), marker.group(2))
            index += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            start = index
            body: list[str] = []
            index += 1
            while index < len(lines) and not lines[index].startswith("```"):
                body.append(lines[index])
                index += 1
            kind, label = pending if pending else (None, None)
            blocks.append(
                CodeBlock(path, start + 1, fence.group(1).lower(), "\n".join(body), kind, label)
            )
            pending = None
        elif line.strip():
            pending = None
        index += 1
    return blocks


def block(name: str, path: Path | None = None) -> CodeBlock:
    """The block marked `<!-- docs-test: name -->` (in README.md by default)."""
    for candidate in code_blocks(path or ROOT / "README.md"):
        if candidate.marker == "test" and candidate.label == name:
            return candidate
    raise AssertionError(f"no block marked docs-test: {name}")
