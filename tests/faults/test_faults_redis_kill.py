"""Redis SIGKILLed mid-run (no clean shutdown, no final AOF write) with `appendonly yes` and
`appendfsync always`, restarted on the same port and dir: every entry still lands in
ClickHouse, and in a stream output, exactly once. (scripts/faults.py --redis-kills N
--appendfsync always runs the long version.)

What makes it hold: with fsync always Redis writes and fsyncs the AOF before it replies, so
everything acknowledged — the producer's XADDs, flowd's ledger records and commit scripts —
is in the AOF the restart replays; a commit whose reply was lost is retried in its checking
mode (acks one by one, writes only the rows of entries still pending) and a batch whose
inserts may have landed is replayed through the ledger and the table's key.
"""

from __future__ import annotations

from pathlib import Path

import faults
import pytest

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)


def test_redis_sigkilled_three_times_with_fsync_always_loses_and_duplicates_nothing(
        tmp_path: Path) -> None:
    # Paced slowly: with fsync always each of the producer's XADDs waits for a disk flush.
    plan = faults.Plan(entries=4_000, rate=500, kills=1, clickhouse_stall_s=0,
                       clickhouse_restart=False, redis_restart=False, pool_kill=False,
                       redis_kills=3, redis_fsync="always", settle_timeout=120)
    counts = faults.run(plan, tmp_path, say=print)
    print(counts.table())
    assert counts.done.count("kill redis") == 3
    assert counts.produced == 4_000
    assert (counts.lost, counts.duplicated) == (0, 0)
    assert (counts.streamed, counts.stream_lost, counts.stream_duplicated) == (4_000, 0, 0)
    assert (counts.pending, counts.left_in_stream, counts.dead_letters) == (0, 0, 0)
