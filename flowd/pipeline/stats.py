"""A flow's counters, kept by one stage-hook subscriber: every figure /metrics, `flowd
status` and the registry show comes from here, counted once per committed batch."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowd.pipeline.batch import Batch

__all__ = ["BATCH_SECONDS_BUCKETS", "FlowStats"]

# Upper bounds (seconds) of the batch duration histogram served on /metrics.
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                         60.0)


@dataclass(slots=True)
class FlowStats:
    read: int = 0
    acked: int = 0
    rows: int = 0
    deduplicated: int = 0
    streamed: int = 0
    dead_lettered: int = 0
    held: int = 0  # failed in the handler this delivery; retried later
    unrouted: int = 0
    ignored_fields: int = 0
    vanished: int = 0  # deleted from the stream while pending
    failed_batches: int = 0
    batches: int = 0
    last_commit_at: float = 0.0  # wall clock (s) of the last commit; 0: none yet
    # Committed batches' durations, per BATCH_SECONDS_BUCKETS bound (+Inf last), not
    # cumulative: kept here so /metrics reads every number from one place at scrape time.
    batch_seconds: list[int] = field(
        default_factory=lambda: [0] * (len(BATCH_SECONDS_BUCKETS) + 1))
    batch_seconds_sum: float = 0.0

    def record_batch(self, seconds: float) -> None:
        self.batch_seconds[bisect.bisect_left(BATCH_SECONDS_BUCKETS, seconds)] += 1
        self.batch_seconds_sum += seconds

    # -- the stage hook (flowd.pipeline.hooks) -----------------------------------------
    def after_commit(self, batch: Batch) -> None:
        self.batches += 1
        self.last_commit_at = time.time()
        self.record_batch(time.monotonic() - batch.started)
        self.read += len(batch.entries)
        self.acked += batch.acked
        self.rows += batch.written.rows
        self.deduplicated += batch.written.deduplicated
        self.streamed += batch.streamed + batch.written.streamed
        self.unrouted += batch.routed.unrouted
        self.ignored_fields += sum(item.ignored_fields for item in batch.prepared)
        self.vanished += batch.fates.vanished
        self.held += len(batch.fates.held)
        if batch.dead_lettered:
            self.dead_lettered += len(batch.fates.rejected)
