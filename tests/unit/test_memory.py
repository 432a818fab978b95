"""The tracker's memory releaser collects only once per `every` records."""

from __future__ import annotations

import gc

import pytest

from consumers.memory import MemoryReleaser


async def test_collects_once_per_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or 0)
    releaser = MemoryReleaser(every=1_000)
    for _ in range(9):
        await releaser.count(100)
    assert collections == []
    await releaser.count(100)  # reaches 1,000
    assert collections == [1]
    for _ in range(9):
        await releaser.count(100)
    assert collections == [1]
    await releaser.count(250)
    assert collections == [1, 1]
