"""Garbage-collector settings for a process that moves batches of thousands of entries.

Each batch allocates tens of thousands of short-lived containers (a dict per record, a
tuple per entry), none of them in reference cycles. With CPython's default thresholds
(700, 10, 10) the collector ran dozens of times per batch and re-scanned the batches
still in flight: a third of the event loop's CPU time in the profile (bench/README.md).
Collecting less often keeps cycle collection (tracebacks, asyncio internals) while it
costs a few megabytes of garbage held a little longer.
"""

from __future__ import annotations

import gc

__all__ = ["THRESHOLDS", "tune"]

THRESHOLDS = (50_000, 20, 10)


def tune() -> None:
    """Apply once the process has started (its modules, config and handlers loaded)."""
    gc.set_threshold(*THRESHOLDS)
    # What exists now lives as long as the process: never scan it again.
    gc.freeze()
