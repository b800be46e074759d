"""A hand-tuned peer for the table path: the strongest plain loop we could write with
flowd's own libraries, doing flowd's job on the reference workload (message-hub entries,
`data` JSON merged in, one MergeTree insert per batch, then acked and deleted).

    python bench/peer_handloop.py REDIS_URL CLICKHOUSE_PORT STREAM TABLE COUNT BATCH

XREADGROUP with hiredis and no reply callback (raw nested lists, no per-entry dicts),
`orjson.loads` on bytes, columns built directly (bytes for String columns, so nothing is
decoded), one columnar insert with types_check=False, then XACK + XDEL pipelined. The
insert runs in a second thread while the next batch is read (a queue of one), as flowd
overlaps its own. Prints one JSON line: {"seconds": ..., "peak_rss_mb": ...}.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
import traceback

import orjson
import redis
from clickhouse_driver import Client
from peerlib import report

GROUP, CONSUMER = "peer", "handloop"
KEYS = [b"rec_id", b"task_for", b"function_type", b"data"]  # the producer's field order


def _by_name(flat: list[bytes]) -> list[bytes]:
    fields = dict(zip(flat[0::2], flat[1::2], strict=True))
    return [x for key in KEYS for x in (key, fields[key])]


def columns(entries: list) -> list[list]:
    flats = [flat for _, flat in entries]
    if any(flat[0::2] != KEYS for flat in flats):  # another field order: by name instead
        flats = list(map(_by_name, flats))
    data = list(map(orjson.loads, [flat[7] for flat in flats]))
    return [list(map(int, [flat[1] for flat in flats])), [flat[3] for flat in flats],
            [flat[5] for flat in flats], [d["a"] for d in data], [d["b"].encode() for d in data]]


def main() -> int:
    url, port, stream, table = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
    count, batch = int(sys.argv[5]), int(sys.argv[6])
    trim = "--trim" in sys.argv
    r = redis.Redis.from_url(url)
    r.set_response_callback("XREADGROUP", lambda response, **_: response)  # raw lists
    ch = Client(host="127.0.0.1", port=port, settings={"strings_as_bytes": True})
    insert = f"INSERT INTO {table} (rec_id, task_for, function_type, a, b) VALUES"
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: already there
        r.xgroup_create(stream, GROUP, id="0")
    todo: queue.Queue = queue.Queue(maxsize=1)

    def writer() -> None:  # insert, then ack + delete, in read order
        try:
            while (ids_cols := todo.get()) is not None:
                ids, cols = ids_cols
                ch.execute(insert, cols, columnar=True, types_check=False)
                pipe = r.pipeline(transaction=False)
                pipe.xack(stream, GROUP, *ids)
                if trim:  # the group reads in order and is the stream's only reader
                    ms, seq = ids[-1].split(b"-")
                    pipe.xtrim(stream, minid=b"%s-%d" % (ms, int(seq) + 1), approximate=False)
                else:
                    pipe.xdel(stream, *ids)
                pipe.execute()
        except BaseException:
            traceback.print_exc()
            os._exit(1)  # the reader would wait on the queue forever

    thread = threading.Thread(target=writer, daemon=True)
    started = time.monotonic()
    thread.start()
    moved = 0
    while moved < count:
        reply = r.execute_command("XREADGROUP", "GROUP", GROUP, CONSUMER, "COUNT", batch,
                                  "BLOCK", 100, "STREAMS", stream, ">")
        if not reply:
            continue
        # RESP3 (redis-py's default) gives {stream: entries}, RESP2 [[stream, entries]]
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        todo.put(([entry_id for entry_id, _ in entries], columns(entries)))
        moved += len(entries)
    todo.put(None)
    thread.join()
    seconds = time.monotonic() - started
    report(seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
