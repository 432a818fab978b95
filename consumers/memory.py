"""Keeping a tracking worker's resident memory flat: collect, then `malloc_trim`.

A worker tracking a backlog allocates and frees a batch's worth of objects
every few milliseconds from several threads (the event loop, one per SQLite
connection). The worker raises the cyclic collector's thresholds (large
plans, see `consumers.worker`), so cyclic garbage reaches the oldest
generation and waits there; and glibc keeps what is freed for reuse,
fragmented across its arenas. The resident size kept climbing although the
live Python heap stayed near 90 MB (tracemalloc): 316-359 MB peak after
1,000,000 tracked events. A full collection and a trim every 50,000 records
kept the peak at ~240 MB, falling to ~150 MB; the trim alone, 304 MB.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

# The worker's collector thresholds. A worker holds large plans (one object
# graph per compensation) while it allocates many short-lived tasks; with the
# default thresholds the cyclic collector re-walks the plans so often that
# rollback time grows quadratically (measured: 2,100/s at 20k compensations
# vs 3,600/s). The benchmark runs with the same.
WORKER_GC_THRESHOLDS = (50_000, 20, 100)


def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim  # glibc only (not musl)
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM = _load_malloc_trim()


class MemoryReleaser:
    """A full collection and `malloc_trim` (where glibc has it) per `every` records."""

    def __init__(self, every: int = 50_000) -> None:
        self.every = every
        self._counted = 0

    async def count(self, records: int) -> None:
        """Count processed records; collect and trim (in a thread: it walks the heap) when due."""
        self._counted += records
        if self._counted < self.every:
            return
        self._counted = 0
        gc.collect()
        if _MALLOC_TRIM is None:
            return
        try:
            # ctypes releases the GIL: the event loop goes on meanwhile.
            await asyncio.to_thread(_MALLOC_TRIM, 0)
        except Exception:  # never let housekeeping break tracking
            log.debug("malloc_trim failed", exc_info=True)
