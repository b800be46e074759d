"""Run a handler offline, through the daemon's own stages: no Redis, no ClickHouse.

`run_handler` takes a handler (its entry-point name, or the object itself), a flow's config
and a list of messages (flat dicts of text, as stream entries are), and answers what the
daemon would do with them: the rows each table output gets, coerced to the table's columns
(given its `DESCRIBE` as a list); the records each stream output gets, as they would be in
the stream; what the handler rejected; what would be dead-lettered, with the reason the
dead letter would carry; and what would stay pending.

Guarantees: every message goes through the functions the daemon's data path calls, in its
order — decode (decode.py) → handle (handle.py) → route (route.py) → prepare (prepare.py)
→ the commit's dead letters and stream records (commit.py, wire.py) — in batches of the
flow's `batch` size, and a batch a stage fails on as the data's fault is split until the
entry at fault is found, as the consumer does. Not predicted: what a ClickHouse server
itself refuses at INSERT time after flowd's coercion (its own constraints), delivery counts
(`max_deliveries`), outages and replays. A `cpu_bound` handler runs in this process, not in
a process pool, on the same batches (the pool would hand each process a part of a batch).

    >>> from flowd.testing import run_handler
    >>> result = run_handler(
    ...     "json_fields",
    ...     [{"rec_id": "1", "data": '{"a": 7}'}, {"rec_id": "2", "data": "[7]"}],
    ...     flow={"to": [{"clickhouse": "events"}], "dead_letter": "dead"},
    ...     tables={"events": [("rec_id", "UInt64"), ("a", "Int64")]})
    >>> result.rows["events"]
    [{'rec_id': 1, 'a': 7}]
    >>> [(letter.index, letter.reason) for letter in result.dead_letters]
    [(1, "field 'data' is JSON but not an object (got list)")]

No product module imports this one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from flowd.admin.dlq import DeadLetter
from flowd.clickhouse.prepare import Prepared, prepare
from flowd.clickhouse.schema import TableSchema, as_text, parse_describe
from flowd.core import config as flowd_config
from flowd.core.config import ClickHouseOutput, Config, FlowConfig, StreamOutput
from flowd.core.errors import ConfigError
from flowd.core.replies import Entry
from flowd.core.retry import is_data_error
from flowd.delivery.commit import CommitPlan, script_arguments
from flowd.pipeline import fate
from flowd.pipeline.handle import Handling
from flowd.pipeline.route import route
from flowd.plugin.decode import decode
from flowd.plugin.discovery import LoadedHandler, load_for_flow
from flowd.plugin.handler import traits
from flowd.plugin.pool import CpuPool

__all__ = ["HandlerResult", "Rejected", "flow_from_file", "flow_from_toml", "run_handler"]

# What config errors of a flow given as keys name as their file.
SOURCE = "<flowd.testing>"
# The defaults of a flow given as keys: the keys a config file requires but a test of a
# handler does not care about.
FLOW_DEFAULTS = {"name": "test", "stream": "test", "group": "test"}

Text = str | bytes  # a stream field: text, or the bytes as stored when not UTF-8
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Rejected:
    """One message set aside, and why.

    `index`: its position in the messages given (None: an id the handler made up);
    `id`: the stream id it had in the run (message i has id ``f"1-{i}"``); `reason`: the
    text the daemon writes (a dead letter's `_flowd_reason`); `fields`: the message's fields.
    """

    index: int | None
    id: str
    reason: str
    fields: Mapping[str, Text]


@dataclass(slots=True)
class HandlerResult:
    """What the daemon would do with the messages.

    - `rows`: per table (keyed as in `tables`), the rows it would insert: column → value,
      coerced by the table's types (a String's value as text); a column a row leaves to its
      DEFAULT is not in it. Rows of one set of columns are inserted together, in order.
    - `streams`: per stream output (its name; ``name@server`` on another Redis), the
      records it would add, field → text, as a client reading the stream sees them.
    - `rejections`: what the handler rejected (`message.reject`, `Columns.rejections`),
      with its reason as given.
    - `dead_letters`: the entries written to the flow's `dead_letter` stream, in message
      order: handler rejections, rows a table cannot take, entries not UTF-8 or over
      `max_entry_bytes`, entries a batch split found at fault ("refused: ...").
    - `pending`: entries left pending, not acked: those the handler raised on (retried,
      and dead-lettered after `max_deliveries` with "delivered N times (max_deliveries M);
      last error: " and this reason), and rejected ones when the flow has no `dead_letter`.
    - `unrouted`: rows that matched no output's `when` (acked, written nowhere).
    - `ignored_fields`: per table, the record fields it has no column for (never written).
    """

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    streams: dict[str, list[dict[str, Text]]] = field(default_factory=dict)
    rejections: list[Rejected] = field(default_factory=list)
    dead_letters: list[Rejected] = field(default_factory=list)
    pending: list[Rejected] = field(default_factory=list)
    unrouted: int = 0
    ignored_fields: dict[str, int] = field(default_factory=dict)


def flow_from_file(path: str | os.PathLike[str], name: str | None = None) -> FlowConfig:
    """The flow `name` of a config file, validated as `flowd check` does (`name` may be
    left out when the file has one flow)."""
    return _pick(flowd_config.load(path), name)


def flow_from_toml(text: str, name: str | None = None) -> FlowConfig:
    """The flow `name` of a config given as TOML text (`name`: as in `flow_from_file`)."""
    return _pick(flowd_config.loads(text, SOURCE), name)


def _pick(config: Config, name: str | None) -> FlowConfig:
    names = [flow.name for flow in config.flows]
    if name is None and len(names) == 1:
        return config.flows[0]
    if name is None:
        raise ConfigError(config.path, f"has {len(names)} flows: name one "
                          f"({', '.join(names) or 'none'})")
    try:
        return config.flow(name)
    except KeyError:
        raise ConfigError(config.path, f"no such flow in this file (flows: "
                          f"{', '.join(names) or 'none'})", flow=name) from None


def run_handler(handler: str | Callable[..., Any] | None,
                messages: Iterable[Mapping[str, Text]], *,
                flow: FlowConfig | Mapping[str, Any],
                tables: Mapping[str, Sequence[Sequence[Any]]] | None = None) -> HandlerResult:
    """Run `handler` on `messages` as the daemon runs a flow's batches, offline.

    `handler`: an entry-point name of group ``flowd.handlers`` (loaded with the flow's
    `options`, as the daemon loads it), or the handler object itself (a function, or an
    instance: a class is not instantiated here); None: the flow's `handler`. It replaces
    the flow's `handler` when given.
    `messages`: one dict per stream entry, field → str (bytes for a value that is not
    text); message i gets the stream id ``f"1-{i}"``.
    `flow`: a `FlowConfig` (`flow_from_file`, `flow_from_toml`) or the keys of one
    ``[[flow]]`` table, e.g. ``{"to": [{"clickhouse": "events"}], "dead_letter": "dead"}``
    (`name`, `stream` and `group` default to "test"), validated as a config file is.
    `tables`: every table output's `DESCRIBE TABLE` rows, by table name ("events" or
    "db.events"): (name, type) pairs, or the rows the server answers as they are.
    """
    flow = _flow(handler, flow)
    loaded = _handler(handler, flow)
    schemas, keys = _schemas(flow, tables or {})
    entries, originals = _entries(messages)
    run = _Run(flow, loaded, schemas, keys, originals)
    return _in_a_loop(lambda: run.all(entries, flow.batch))


# -- inputs -------------------------------------------------------------------------------
def _flow(handler: str | Callable[..., Any] | None,
          flow: FlowConfig | Mapping[str, Any]) -> FlowConfig:
    if isinstance(flow, FlowConfig):
        if isinstance(handler, str) and handler != flow.handler:
            flow = dataclasses.replace(flow, handler=handler)
        return flow
    if not isinstance(flow, Mapping):
        raise TypeError(f"flow must be a FlowConfig (flow_from_file, flow_from_toml) or the "
                        f"keys of a [[flow]] table, not {type(flow).__name__}")
    keys = {**FLOW_DEFAULTS, **flow}
    if isinstance(handler, str):
        keys["handler"] = handler
    elif handler is not None:
        keys.setdefault("handler", getattr(handler, "__name__", type(handler).__name__))
    if "handler" not in keys:
        raise TypeError("no handler: pass one, or a `handler` key in `flow`")
    return flowd_config.parse({"flow": [keys]}, SOURCE).flows[0]


def _handler(handler: str | Callable[..., Any] | None, flow: FlowConfig) -> LoadedHandler:
    """The handler, to be run in this process (a cpu_bound one too)."""
    if handler is None or isinstance(handler, str):
        loaded = load_for_flow(flow, SOURCE)
    elif isinstance(handler, type):
        raise TypeError(f"{handler.__name__} is a class: pass an instance "
                        f"({handler.__name__}(...)) or its entry-point name")
    elif not callable(handler):
        raise TypeError(f"a handler must be callable, not {type(handler).__name__}")
    else:
        _, batch_format = traits(handler)
        loaded = LoadedHandler(flow.handler, handler, False, batch_format, repr(handler))
    return dataclasses.replace(loaded, cpu_bound=False)


def _schemas(flow: FlowConfig, tables: Mapping[str, Sequence[Sequence[Any]]],
             ) -> tuple[dict[str, TableSchema], dict[str, str]]:
    """Each table output's schema and the key `tables` names it by, by its target."""
    schemas: dict[str, TableSchema] = {}
    keys: dict[str, str] = {}
    used: set[str] = set()
    for i, out in enumerate(flow.to):
        if not isinstance(out, ClickHouseOutput):
            continue
        matches = [key for key in tables if _names(key, out)]
        if len(matches) != 1:
            short = out.table.split(".", 1)[1]
            problem = "no DESCRIBE for it" if not matches else \
                f"described more than once ({', '.join(map(repr, matches))})"
            raise ValueError(f'flow "{flow.name}": to[{i}]: table {out.table}: {problem}: '
                             f'pass tables={{"{short}": [("column", "Type"), ...]}}')
        key = keys[out.target] = matches[0]
        used.add(key)
        schemas[out.target] = parse_describe(out.table, _describe(key, tables[key]))
    if unused := [key for key in tables if key not in used]:
        known = ", ".join(sorted({out.table for out in flow.to
                                  if isinstance(out, ClickHouseOutput)})) or "none"
        raise ValueError(f'tables {unused}: no table output of flow "{flow.name}" writes '
                         f"such a table (its tables: {known})")
    return schemas, keys


def _names(key: str, out: ClickHouseOutput) -> bool:
    return key in (out.table, out.target) or ("." not in key and not out.server
                                              and out.table.split(".", 1)[1] == key)


def _describe(key: str, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    described = []
    for row in rows:
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) < 2 \
                or not all(isinstance(part, str) for part in row[:2]):
            raise TypeError(f'tables["{key}"]: {row!r} is not a DESCRIBE row: give '
                            f'(name, type) pairs such as ("rec_id", "UInt64")')
        described.append(tuple(row))
    return described


def _entries(messages: Iterable[Mapping[str, Text]]) -> tuple[list[Entry], dict[str, Any]]:
    """Messages as the reader hands entries on: (id, [name, value, ...] as bytes)."""
    entries: list[Entry] = []
    originals: dict[str, Any] = {}
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {index} is {type(message).__name__}, not a dict of "
                            "stream fields")
        flat: list[bytes] = []
        for name, value in message.items():
            if not isinstance(name, str) or not isinstance(value, (str, bytes)):
                raise TypeError(f"message {index}, field {name!r}: stream fields are text, "
                                f"got {type(value).__name__} {value!r} (pass str)")
            flat += (name.encode(), value.encode() if isinstance(value, str) else value)
        entry_id = f"1-{index}"
        entries.append((entry_id, flat))
        originals[entry_id] = (index, dict(message))
    return entries, originals


def _in_a_loop(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end, also from a caller already inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(lambda: asyncio.run(make())).result()


# -- the stages -----------------------------------------------------------------------------
@dataclass(slots=True)
class _Staged:
    """One batch through the stages, up to what its commit would write."""

    ids: list[str]  # the batch's entries, in order
    batch: CommitPlan
    prepared: list[tuple[ClickHouseOutput, Prepared]]
    rejections: list[tuple[str, str]]
    held: dict[str, str]
    rejected: dict[str, str]
    unrouted: int


class _Run:
    def __init__(self, flow: FlowConfig, handler: LoadedHandler,
                 schemas: dict[str, TableSchema], keys: dict[str, str],
                 originals: dict[str, Any]) -> None:
        self.flow, self.schemas, self.keys, self.originals = flow, schemas, keys, originals
        # The pool is never started: the handler runs in this process (cpu_bound = False).
        self.handling = Handling(flow, handler, CpuPool(1))
        self.result = HandlerResult(
            rows={key: [] for key in keys.values()},
            streams={out.target: [] for out in flow.to if isinstance(out, StreamOutput)},
            ignored_fields={key: 0 for key in keys.values()})

    async def all(self, entries: list[Entry], size: int) -> HandlerResult:
        for start in range(0, len(entries), size):
            await self.deliver(entries[start:start + size])
        for found in (self.result.dead_letters, self.result.pending):
            found.sort(key=lambda rejected: -1 if rejected.index is None else rejected.index)
        return self.result

    async def deliver(self, entries: list[Entry]) -> None:
        """As FlowConsumer does: a batch the data is to blame for is split until the entry
        at fault is found, and that one is dead-lettered with the error (fate.bisect)."""
        async def attempt(part: list[Entry]) -> None:
            self.keep(await self.stages(part))

        async def blame(part: list[Entry], exc: Exception) -> None:
            self.keep(await self.stages(part, refused=fate.refused(exc)))

        await fate.bisect(entries, len, _halves, attempt, blame, is_data_error)

    async def stages(self, entries: list[Entry], refused: str | None = None) -> _Staged:
        """decode → handle → route → prepare, and what the commit would write."""
        decoded = decode(entries, self.flow.max_entry_bytes)
        fates = fate.Fates(rejected=decoded.rejected)
        if refused is not None:
            fates.refuse((entry_id for entry_id, _ in decoded.live), refused)
            decoded.live = []
        outcome, held = await self.handling.run(decoded)
        fates.handled(outcome.rejections, held)
        routed = route(self.flow.to, outcome.columns)
        prepared = [(out, prepare(self.schemas[out.target], rows, out.columns))
                    for out, rows in routed.tables]
        for _, item in prepared:
            fates.tables_refused(item)
        for _, item in prepared:  # written: the rows of entries neither rejected nor held
            item.drop_sources(fates.unwritten)
        plan = fates.commit_plan(self.flow, entries,
                                 [(out.target, rows) for out, rows in routed.streams], {})
        return _Staged([entry_id for entry_id, _ in entries], plan, prepared,
                       outcome.rejections, fates.held, fates.rejected, routed.unrouted)

    # -- results --------------------------------------------------------------------------
    def keep(self, staged: _Staged) -> None:
        result = self.result
        result.unrouted += staged.unrouted
        result.rejections += [self.rejected(entry_id, reason)
                              for entry_id, reason in staged.rejections]
        for out, item in staged.prepared:
            key = self.keys[out.target]
            result.ignored_fields[key] += item.ignored_fields
            result.rows[key] += _rows(item)
        batch = staged.batch
        for stream, records in _committed(CommitPlan(batch.ack, streams=batch.streams)).items():
            result.streams[stream] += [_texts(record) for record in records]
        for records in _committed(CommitPlan(batch.ack, dead_letters=batch.dead_letters)).values():
            for record in records:
                letter = DeadLetter("", record)
                assert letter.source_id is not None and letter.reason is not None
                result.dead_letters.append(dataclasses.replace(
                    self.rejected(letter.source_id, letter.reason),
                    fields=_texts(letter.original)))
        acked = set(batch.ack)
        result.pending += [
            self.rejected(entry_id, staged.held.get(entry_id) or staged.rejected[entry_id])
            for entry_id in staged.ids if entry_id not in acked]

    def rejected(self, entry_id: str, reason: str) -> Rejected:
        index, fields = self.originals.get(entry_id, (None, {}))
        return Rejected(index, entry_id, reason, fields)


def _halves(entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    middle = len(entries) // 2
    return entries[:middle], entries[middle:]


def _rows(prepared: Prepared) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for names, block in prepared.groups.items():
        columns = [as_text(values) for values in block.columns]
        rows += [dict(zip(names, values, strict=True))
                 for values in zip(*columns, strict=True)] if names else []
    return rows


def _committed(batch: CommitPlan) -> dict[str, list[dict[bytes, bytes]]]:
    """The records the commit script would add to each stream, field → value as stored:
    the script's own argument (commit.script_arguments), unpacked as the script does."""
    keys, packed = script_arguments(batch)
    added: dict[str, list[dict[bytes, bytes]]] = {}
    for key, names, flat in (msgpack.unpackb(packed, raw=True) if packed else []):
        records = added.setdefault(keys[key - 3], [])  # KEYS[1..2]: the source, the ledger
        if names:  # every row the same fields: source, v1..vn, source, ...
            width = len(names) + 1
            records += [dict(zip(names, flat[i + 1:i + width], strict=True))
                        for i in range(0, len(flat), width)]
            continue
        i = 0
        while i < len(flat):  # source, npairs, f1, v1, ...: a row without fields is no XADD
            pairs = flat[i + 1]
            if pairs:
                values = flat[i + 2:i + 2 + 2 * pairs]
                records.append(dict(zip(values[::2], values[1::2], strict=True)))
            i += 2 + 2 * pairs
    return added


def _texts(record: Mapping[bytes, bytes]) -> dict[str, Text]:
    return {_text(name): _text(value) for name, value in record.items()}  # type: ignore[misc]


def _text(value: bytes) -> Text:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value
