"""The old way, written plainly, as the benchmark's baseline: XRANGE a batch, build a pandas
DataFrame, insert it, XDEL the batch. No consumer group, no ledger, no retries.

    python bench/baseline.py REDIS_URL CLICKHOUSE_PORT STREAM TABLE COUNT BATCH [--pure-python]

prints one JSON line: {"seconds": ..., "peak_rss_mb": ...}. --pure-python reads Redis
replies with redis-py's own parser, as a deployment without hiredis does.
"""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
import redis
from clickhouse_driver import Client
from peerlib import report
from redis._parsers import _RESP2Parser

COLUMNS = ["rec_id", "task_for", "function_type", "a", "b"]


def main() -> int:
    url, port, stream, table = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
    count, batch = int(sys.argv[5]), int(sys.argv[6])
    options = {"parser_class": _RESP2Parser} if "--pure-python" in sys.argv else {}
    r = redis.Redis.from_url(url, decode_responses=True, **options)
    ch = Client(host="127.0.0.1", port=port)
    moved = 0
    started = time.monotonic()
    while moved < count:
        entries = r.xrange(stream, count=batch)
        if not entries:
            continue
        rows = [{**fields, **json.loads(fields["data"])} for _, fields in entries]
        frame = pd.DataFrame(rows)[COLUMNS]
        frame["rec_id"] = frame["rec_id"].astype("uint64")
        frame["a"] = frame["a"].astype("int64")
        ch.execute(f"INSERT INTO {table} ({', '.join(COLUMNS)}) VALUES",
                   frame.to_dict("records"))
        r.xdel(stream, *[entry_id for entry_id, _ in entries])
        moved += len(entries)
    seconds = time.monotonic() - started
    report(seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
