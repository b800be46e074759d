"""The CI-sized fault run: flowd SIGKILLed, ClickHouse frozen and restarted, Redis
restarted, a pool worker killed, crashes injected between insert and ack — and still
every entry lands in ClickHouse, and in a stream output, exactly once. (scripts/faults.py
runs the long version.)"""

from __future__ import annotations

from pathlib import Path

import faults
import pytest

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)


def test_twenty_thousand_entries_through_kills_and_outages_lose_and_duplicate_nothing(
        tmp_path: Path) -> None:
    plan = faults.Plan(entries=20_000, rate=2_500, kills=5, clickhouse_stall_s=4,
                       crash_after_insert=0.02, settle_timeout=180)
    counts = faults.run(plan, tmp_path, say=print)
    print(counts.table())
    assert counts.produced == 20_000
    assert counts.lost == 0
    assert counts.duplicated == 0
    # The stream path, in the same run: the copy of every entry exactly once.
    assert (counts.streamed, counts.stream_lost, counts.stream_duplicated) == (20_000, 0, 0)
    assert counts.pending == 0
    assert counts.left_in_stream == 0
    assert counts.dead_letters == 0
    assert counts.flowd_starts >= 6  # the kills happened (plus any injected crash)
