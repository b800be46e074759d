"""A FastStream peer for the table path: FastStream's Redis batch stream subscriber doing
flowd's job on the reference workload (message-hub entries, `data` JSON merged in, one
MergeTree insert per batch, then acked and deleted).

    python bench/peer_faststream.py REDIS_URL CLICKHOUSE_PORT STREAM TABLE COUNT BATCH \
        FLUSH_MS

`StreamSub(batch=True)` in a consumer group created beforehand at id 0 (so it reads the
backlog), `max_records` = BATCH and `polling_interval` (XREADGROUP's BLOCK) = FLUSH_MS,
as flowd's defaults, on uvloop as flowd runs. The handler gets FastStream's decoded body
(one dict of str per entry), builds the columns, inserts them with one columnar
clickhouse-driver insert (types_check=False), then acks and deletes the batch (manual ack
policy: XACK, XDEL).
The clock runs from the broker's start to the last batch acked. Prints one JSON line:
{"seconds": ..., "peak_rss_mb": ...}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Any

import orjson
import redis
import uvloop
from clickhouse_driver import Client
from faststream import AckPolicy
from faststream.redis import RedisBatchStreamMessage, RedisBroker, StreamSub
from peerlib import report

GROUP, CONSUMER = "peer", "faststream"


async def run(url: str, port: int, stream: str, table: str, count: int, batch: int,
              flush_ms: int) -> float:
    ch = Client(host="127.0.0.1", port=port)
    insert = f"INSERT INTO {table} (rec_id, task_for, function_type, a, b) VALUES"
    broker = RedisBroker(url, log_level=logging.WARNING)
    done = asyncio.Event()
    moved = 0

    @broker.subscriber(stream=StreamSub(stream, group=GROUP, consumer=CONSUMER, batch=True,
                                        max_records=batch, polling_interval=flush_ms),
                       ack_policy=AckPolicy.MANUAL)
    async def handle(body: list[dict[str, Any]], msg: RedisBatchStreamMessage) -> None:
        nonlocal moved
        data = [orjson.loads(fields["data"]) for fields in body]
        ch.execute(insert, [[int(f["rec_id"]) for f in body], [f["task_for"] for f in body],
                            [f["function_type"] for f in body], [d["a"] for d in data],
                            [d["b"] for d in data]], columnar=True, types_check=False)
        await msg.ack()
        await msg.delete()
        moved += len(body)
        if moved >= count:
            done.set()

    await broker.connect()
    started = time.monotonic()
    await broker.start()
    await done.wait()
    seconds = time.monotonic() - started
    await broker.stop()
    return seconds


def main() -> int:
    url, port, stream, table = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
    count, batch, flush_ms = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: already there
        redis.Redis.from_url(url).xgroup_create(stream, GROUP, id="0")
    # The subscriber's read loop logs a harmless ConnectionError when the broker closes.
    logging.disable(logging.ERROR)
    seconds = uvloop.run(run(url, port, stream, table, count, batch, flush_ms))
    report(seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
