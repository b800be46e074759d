"""Publishing flat records to a stream: the message hub's way in.

`publish()` (and `publish_async()`) for Python producers, `send_lines()` behind
`flowd send` for JSON lines. A record is a flat map: every value a string, an integer, a
float or a boolean, because a stream entry is a flat map of strings and nothing nested can
round-trip through it. Values are written as text, by the rule stream outputs follow
(wire.stream_text): 5 → "5", 1.5 → "1.5", true → "1".

The overflow guard is the old system's: when the target stream already holds `max_len`
entries (or more), publishing stops and says how many were written, rather than trimming
entries nobody has read yet.

One size limit for every way in: `entry_limit()` is the largest entry a stream takes (the
`max_entry_bytes` of the flows reading it, which would dead-letter anything bigger), and
`flowd send` refuses a bigger entry just as `POST /v1/streams/{stream}` (flowd.http.ingest) does:
an InvalidRecord naming it, nothing of it written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain, islice
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from flowd.core.config import Config, FlowConfig, StreamOutput
from flowd.core.errors import DataError, FlowdError, TransientError
from flowd.core.lua import Lua
from flowd.core.wire import FLAT_TEXT, XADD_ROWS, pack_blocks, stream_text, wire_fields

__all__ = [
    "DEFAULT_CHUNK",
    "InvalidRecord",
    "PublishError",
    "StreamFull",
    "encode",
    "entry_limit",
    "entry_size",
    "known_streams",
    "publish",
    "publish_async",
    "send_lines",
    "stream_limit",
]

DEFAULT_CHUNK = 2000  # entries per server-side call
# For a stream no flow of the config reads: a flow's default.
DEFAULT_MAX_ENTRY_BYTES: int = next(f.default for f in dataclasses.fields(FlowConfig)
                                    if f.name == "max_entry_bytes")

Fields = dict[str | bytes, str | bytes]
Numbered = Iterable[tuple[int, Any]]  # (line or record number, record)


class PublishError(FlowdError):
    """Publishing stopped; `written` entries (the first ones, in order) are in the stream."""

    def __init__(self, problem: str, *, written: int = 0) -> None:
        super().__init__(problem)
        self.problem = problem
        self.written = written

    def __str__(self) -> str:
        return f"{self.problem}; wrote {self.written} entries before stopping"


class InvalidRecord(PublishError, DataError):
    """A record that cannot be an entry (nested value, null, not an object). Nothing of the
    chunk holding it was written; with a whole input checked first, nothing at all."""

    def __init__(self, position: str, problem: str, *, key: str | None = None) -> None:
        where = position if key is None else f'{position}: key "{key}"'
        super().__init__(f"{where}: {problem}")
        self.position = position
        self.key = key

    def __str__(self) -> str:
        if self.written == 0:
            return f"{self.problem}; nothing was written"
        return f"{self.problem}; the {self.written} entries before it were written"


class StreamFull(PublishError, TransientError):
    """The target stream holds `max_len` entries or more: the rest was refused."""

    def __init__(self, stream: str, length: int, max_len: int,
                 total: int | None = None) -> None:
        super().__init__(f"stream {stream} is full (len {length} >= max_len {max_len})")
        self.stream, self.length, self.max_len, self.total = stream, length, max_len, total

    def __str__(self) -> str:
        of = f" of {self.total}" if self.total is not None else ""
        return f"wrote {self.written}{of}; {self.problem}"


def encode(record: Any, position: str = "record") -> Fields:
    """A record as stream fields, or InvalidRecord naming `position` and the key."""
    if not isinstance(record, Mapping):
        raise InvalidRecord(position, f"must be an object of fields, got {_kind(record)}")
    if not record:
        raise InvalidRecord(position, "has no fields (a stream entry needs at least one)")
    # The usual record: text names, text or integer values; checked in C, set by type.
    if set(map(type, record)) <= _TEXT:
        kinds = set(map(type, record.values()))
        if kinds <= _TEXT:
            return record if type(record) is dict else dict(record)
        if kinds <= _TEXT_OR_INT:
            return {key: str(value) if type(value) is int else value
                    for key, value in record.items()}
        if kinds <= _FLAT and all(map(math.isfinite, (value for value in record.values()
                                                      if type(value) is float))):
            return {key: FLAT_TEXT[type(value)](value) for key, value in record.items()}
    fields: Fields = {}
    for key, value in record.items():
        if not isinstance(key, str | bytes):
            raise InvalidRecord(position, f"field names must be strings, got {_kind(key)} "
                                          f"{key!r}")
        name = key if isinstance(key, str) else key.decode(errors="replace")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRecord(position, f"{value!r} is not a finite number", key=name)
        if not isinstance(value, str | bytes | int | float):  # bool is an int
            raise InvalidRecord(position, _refusal(value), key=name)
        fields[key] = stream_text(value)  # as a stream output holds it (wire.py)
    return fields


_TEXT = {str, bytes}
_TEXT_OR_INT = {str, bytes, int}
_FLAT = set(FLAT_TEXT)


def _refusal(value: Any) -> str:
    if isinstance(value, Mapping):
        return "nested object (values must be flat: string, number or boolean)"
    if isinstance(value, list | tuple | set):
        return "nested array (values must be flat: string, number or boolean)"
    if value is None:
        return "null (omit the field, or send a string)"
    return f"{type(value).__name__} value (values must be string, number or boolean)"


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def entry_size(fields: Fields) -> int:
    """An entry's size as `max_entry_bytes` counts it: its names and values, in bytes."""
    return sum(len(part) if isinstance(part, bytes) else len(part.encode())
               for pair in fields.items() for part in pair)


def checked(record: Any, position: str, max_bytes: int | None) -> Fields:
    """`encode()`, and InvalidRecord when the entry is bigger than `max_bytes`."""
    fields = encode(record, position)
    if max_bytes is not None and (size := entry_size(fields)) > max_bytes:
        raise InvalidRecord(position, f"is {size} bytes, over max_entry_bytes "
                                      f"({max_bytes} bytes)")
    return fields


def _chunks(items: Numbered, label: str, chunk: int, check_all_first: bool,
            max_bytes: int | None = None) -> tuple[Iterator[list[Fields]], int | None]:
    """Encoded chunks, and the total when the whole input was checked first."""
    encoded = ((f"{label} {n}", record) for n, record in items)
    if check_all_first:
        everything = [checked(record, position, max_bytes) for position, record in encoded]
        return (everything[i:i + chunk] for i in range(0, len(everything), chunk)), \
            len(everything)

    def lazily() -> Iterator[list[Fields]]:
        while batch := list(islice(encoded, chunk)):
            # The whole chunk is checked before any of it is written.
            yield [checked(record, position, max_bytes) for position, record in batch]

    return lazily(), None


# KEYS[1]: the stream. ARGV: max_len ("" for none), the records (wire.py's blocks). The
# overflow check and the writes are one atomic call: a record is added only while the
# stream holds fewer than max_len entries, and no other writer slips in between.
PUBLISH = Lua(r"""
local room, length = -1, 0
if ARGV[1] ~= '' then
  length = redis.call('XLEN', KEYS[1])
  room = tonumber(ARGV[1]) - length
  if room <= 0 then return {0, length} end
end
local taken = 0
local function keep(source)
  if room >= 0 and taken >= room then return false end
  taken = taken + 1
  return true
end
local blocks = cmsgpack.unpack(ARGV[2])
""" + XADD_ROWS + r"""
return {streamed, length + streamed}
""")


def _block(encoded: list[Fields]) -> bytes:
    first = list(encoded[0])
    if all(len(fields) == len(first) and list(fields) == first for fields in encoded):
        rows = list(chain.from_iterable((0, *fields.values()) for fields in encoded))
        return pack_blocks([[1, first, rows]])
    return pack_blocks([wire_fields(1, [(0, fields) for fields in encoded])])


def _written(stream: str, reply: Any, max_len: int | None, total: int | None) -> int:
    """How many the script added; StreamFull when it could add none for want of room."""
    added, length = int(reply[0]), int(reply[1])
    if not added and max_len is not None:
        raise StreamFull(stream, length, max_len, total)
    return added


def _publish_numbered(client: redis.Redis, stream: str, items: Numbered, *, label: str,
                      check_all_first: bool, max_len: int | None, chunk: int,
                      max_bytes: int | None = None) -> int:
    written = 0
    limit = "" if max_len is None else str(max_len)
    try:
        chunks, total = _chunks(items, label, chunk, check_all_first, max_bytes)
        for encoded in chunks:
            # One script call per chunk: it is in the stream whole (or up to the room
            # left), so `written` is exact when something goes wrong.
            while encoded:
                reply = PUBLISH(client, [stream], [limit, _block(encoded)])
                added = _written(stream, reply, max_len, total)
                written += added
                encoded = encoded[added:]
    except PublishError as exc:
        exc.written = written
        raise
    except redis.RedisError as exc:
        raise PublishError(f"Redis error on stream {stream}: {exc}", written=written) from exc
    return written


def publish(client: redis.Redis, stream: str, records: Iterable[Mapping[str, Any]], *,
            max_len: int | None = None, chunk: int = DEFAULT_CHUNK) -> int:
    """XADD flat `records` to `stream`, a chunk per server-side call; the number written.

    A list (any Sequence) is checked whole before anything is written; another iterable is
    checked a chunk at a time, each chunk before any of it is written. With `max_len`,
    writing stops once the stream holds that many entries: StreamFull says how many were
    written. Every PublishError carries `.written`.
    """
    return _publish_numbered(client, stream, enumerate(records, 1), label="record",
                             check_all_first=isinstance(records, Sequence), max_len=max_len,
                             chunk=_positive_chunk(chunk))


async def publish_async(client: aioredis.Redis, stream: str,
                        records: Iterable[Mapping[str, Any]], *, max_len: int | None = None,
                        chunk: int = DEFAULT_CHUNK) -> int:
    """`publish()` for an asyncio client (redis.asyncio), with the same rules."""
    written = 0
    limit = "" if max_len is None else str(max_len)
    try:
        chunks, total = _chunks(enumerate(records, 1), "record", _positive_chunk(chunk),
                                isinstance(records, Sequence))
        for encoded in chunks:
            while encoded:
                reply = await PUBLISH(client, [stream], [limit, _block(encoded)])
                added = _written(stream, reply, max_len, total)
                written += added
                encoded = encoded[added:]
    except PublishError as exc:
        exc.written = written
        raise
    except redis.RedisError as exc:
        raise PublishError(f"Redis error on stream {stream}: {exc}", written=written) from exc
    return written


def _positive_chunk(chunk: int) -> int:
    if chunk < 1:
        raise ValueError(f"chunk must be 1 or more, got {chunk}")
    return chunk


# -- JSON lines (`flowd send`) ---------------------------------------------------------
def _json_lines(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) per non-blank line; bad JSON is an InvalidRecord."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InvalidRecord(f"line {number}", f"not valid JSON ({exc})") from None


def send_lines(client: redis.Redis, stream: str, lines: Iterable[str | bytes], *,
               check_all_first: bool, max_len: int | None = None,
               chunk: int = DEFAULT_CHUNK, max_entry_bytes: int | None = None) -> int:
    """Publish JSON lines (one flat object per line, blank lines skipped); errors name the
    line. `check_all_first`: read and check every line before writing any (a file);
    otherwise chunk by chunk (stdin, which may never end). A line whose entry is over
    `max_entry_bytes` is refused like any invalid line."""
    return _publish_numbered(client, stream, _json_lines(lines), label="line",
                             check_all_first=check_all_first, max_len=max_len,
                             chunk=_positive_chunk(chunk), max_bytes=max_entry_bytes)


def entry_limit(config: Config, stream: str, server: str = "") -> int:
    """The largest entry `stream` (on the Redis named `server`) takes: the smallest
    `max_entry_bytes` of the flows reading it, as they would dead-letter a bigger one; the
    default (8 MiB) when no flow reads it."""
    limits = [flow.max_entry_bytes for flow in config.flows
              if flow.stream == stream and flow.server == server]
    return min(limits, default=DEFAULT_MAX_ENTRY_BYTES)


def stream_limit(config: Config, stream: str, server: str = "") -> int | None:
    """The max_len the config gives `stream` (on the Redis named `server`) as a
    `[[flow.to]]` output (the smallest, when several outputs name it); None when it has
    none, e.g. a flow's source stream."""
    limits = [out.max_len for flow in config.flows for out in flow.to
              if isinstance(out, StreamOutput) and out.stream == stream
              and out.server == server and out.max_len is not None]
    return min(limits) if limits else None


def known_streams(config: Config, server: str = "") -> set[str]:
    """Every stream the config names on the Redis named `server`: flow sources, stream
    outputs and dead letters."""
    streams: set[str] = set()
    for flow in config.flows:
        if flow.server == server:
            streams.add(flow.stream)
            if flow.dead_letter:
                streams.add(flow.dead_letter)
        streams.update(out.stream for out in flow.to
                       if isinstance(out, StreamOutput) and out.server == server)
    return streams
