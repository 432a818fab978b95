"""A new SQLite ledger file opened by many at once: WAL mode, migrated once, no crash.

Switching a file to WAL needs it to itself, and SQLite answers "database is
locked" at once (without waiting out the busy timeout) while another
connection holds it — e.g. a worker migrating the new ledger while a second
one starts. CI caught two workers started together failing this way.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

from sagas.ledger import Ledger

ROUNDS = 10
OPENERS = 6


async def _open_count_close(url: str) -> int:
    ledger = await Ledger.open(url)
    try:
        return await ledger.count_events()
    finally:
        await ledger.close()


def _journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        return str(connection.execute("PRAGMA journal_mode").fetchone()[0])


async def test_many_openers_in_one_process_each_get_a_migrated_wal_ledger(
    tmp_path: Path,
) -> None:
    for round_ in range(ROUNDS):
        path = tmp_path / f"ledger-{round_}.db"
        url = f"sqlite+aiosqlite:///{path}"
        counts = await asyncio.gather(*(_open_count_close(url) for _ in range(OPENERS)))
        assert counts == [0] * OPENERS
        assert _journal_mode(path) == "wal"


def test_processes_opening_a_new_ledger_together_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    url = f"sqlite+aiosqlite:///{path}"
    program = (
        "import asyncio, sys\n"
        "from sagas.ledger import Ledger\n"
        "async def main():\n"
        "    ledger = await Ledger.open(sys.argv[1])\n"
        "    print(await ledger.count_events())\n"
        "    await ledger.close()\n"
        "asyncio.run(main())\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", program, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        assert out.strip() == "0"
    assert _journal_mode(path) == "wal"
