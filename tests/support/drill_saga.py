"""A saga module for the operations runbook's drills (docs/operations/runbook.md).

`SeatBooked` events are undone by sending `ReleaseSeat` to `drill.commands`
(no service answers: the step declares no confirmation). Two payload fields
make a rollback misbehave on purpose:

- `"broken": true` — the handler raises `PermanentError` while the file named
  by `$DRILL_BROKEN_FILE` exists (the "booking service" refuses), so an
  operator can fix the cause (delete the file) and retry;
- `"delay": seconds` — the handler takes that long, so a rollback of many
  events in one saga instance runs long enough to be paused.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sagas import CompensationContext, PermanentError, Saga

BROKEN_FILE_ENV = "DRILL_BROKEN_FILE"
COMMANDS_TOPIC = "drill.commands"

drill = Saga("drill")


def _refusing() -> bool:
    name = os.environ.get(BROKEN_FILE_ENV, "")
    return bool(name) and Path(name).exists()


@drill.compensate("SeatBooked")
async def release_seat(event: dict[str, object], ctx: CompensationContext) -> None:
    """Release a booked seat (or refuse, or dawdle, as the payload says)."""
    seat = str(event["seat"])
    if event.get("broken") and _refusing():
        raise PermanentError(f"booking service refused to release seat {seat}")
    delay = float(str(event.get("delay", 0)))
    if delay > 0:
        await asyncio.sleep(delay)
    await ctx.send(COMMANDS_TOPIC, {"command": "ReleaseSeat", "seat": seat}, key=seat)
