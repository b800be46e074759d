"""The naive peer for the stream path: stream → stream fan-out as a user would write it
with redis-py, doing flowd's job (every entry to OUT_ALL, the ones with task_for = "nlp"
also to OUT_NLP, then acked and deleted).

    python bench/peer_multi.py REDIS_URL STREAM OUT_ALL OUT_NLP COUNT BATCH BLOCK_MS

XREADGROUP of BATCH entries (decoded dicts), then one MULTI/EXEC pipeline holding the
XADDs for both outputs, the XACK and the XDEL, so a batch moves whole or not at all (as
flowd's commit does). Prints one JSON line: {"seconds": ..., "peak_rss_mb": ...}.
"""

from __future__ import annotations

import contextlib
import sys
import time

import redis
from peerlib import report

GROUP, CONSUMER = "peer", "multi"


def main() -> int:
    url, stream, out_all, out_nlp = sys.argv[1:5]
    count, batch, block_ms = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    r = redis.Redis.from_url(url, decode_responses=True)
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: already there
        r.xgroup_create(stream, GROUP, id="0")
    moved = 0
    started = time.monotonic()
    while moved < count:
        reply = r.xreadgroup(GROUP, CONSUMER, {stream: ">"}, count=batch, block=block_ms)
        if not reply:
            continue
        entries = reply[stream][0] if isinstance(reply, dict) else reply[0][1]
        pipe = r.pipeline(transaction=True)
        for _, fields in entries:
            pipe.xadd(out_all, fields)
            if fields.get("task_for") == "nlp":
                pipe.xadd(out_nlp, fields)
        ids = [entry_id for entry_id, _ in entries]
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
        moved += len(entries)
    seconds = time.monotonic() - started
    report(seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
