"""The network between flowd and its servers cut and degraded: flowd runs in a network
namespace of its own, with one veth link to Redis and another to ClickHouse
(scripts/netns.py); each link is cut (down: no RST, no FIN — connections just hang) for
longer than the ClickHouse client's send_receive_timeout, and both are slowed (a rate limit
with a bounded queue: delay, and tail drops under load). Every entry still lands in
ClickHouse, and in a stream output, exactly once. (scripts/faults.py --network runs the
long version.)

An insert cut off after its data was sent ends in a timeout: its outcome is unknown, so the
batch is replayed through the ledger and the table's key, never retried blindly; a commit
whose answer was cut off is retried in its checking mode.
"""

from __future__ import annotations

from pathlib import Path

import faults
import netns
import pytest

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)


def test_links_to_redis_and_clickhouse_cut_and_slowed_lose_and_duplicate_nothing(
        tmp_path: Path) -> None:
    if (why := netns.supported()) is not None:
        pytest.skip(f"no network namespaces here: {why}")
    plan = faults.Plan(entries=12_000, rate=1_000, kills=0, clickhouse_stall_s=0,
                       clickhouse_restart=False, redis_restart=False, pool_kill=False,
                       network=True, network_cuts=2, network_cut_s=4, degrade_s=3,
                       settle_timeout=120)
    counts = faults.run(plan, tmp_path, say=print)
    print(counts.table())
    assert {"cut redis", "restore redis", "cut clickhouse", "restore clickhouse",
            "degrade the network", "undegrade the network"} <= set(counts.done)
    assert counts.produced == 12_000
    assert (counts.lost, counts.duplicated) == (0, 0)
    assert (counts.streamed, counts.stream_lost, counts.stream_duplicated) == (12_000, 0, 0)
    assert (counts.pending, counts.left_in_stream, counts.dead_letters) == (0, 0, 0)
    assert counts.flowd_starts == 1  # flowd waited the outages out: it never died
