"""[[flow]] and its [[flow.to]] outputs, then what holds across flows: unique names, one
flow per consumer group, and in Redis Cluster one hash slot per flow's commit."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from flowd.core.config.model import ClickHouseOutput, FlowConfig, Output, StreamOutput
from flowd.core.config.section import (
    IDENTIFIER,
    Section,
    kind_of,
    non_empty,
    non_negative,
    positive,
    table_name,
)
from flowd.core.config.servers import Servers
from flowd.core.errors import ConfigError
from flowd.core.keys import hashed_part

__all__ = ["read_flows", "read_stream_output"]


def _when(section: Section) -> dict[str, str]:
    when = section.get("when", dict, {})
    for name, value in when.items():
        if not isinstance(value, str):
            section.fail(f"when.{name}", f"must be a string (stream fields are strings), "
                                         f"got {kind_of(value)} {value!r}")
    return dict(when)


def _output(path: Path, flow: str, index: int, table: Any, servers: Servers) -> Output:
    prefix = f"to[{index}]."
    known = {"clickhouse", "stream", "when", "columns", "key", "max_len", "server",
             "dedup_window_s"}
    section = Section(path, table, prefix=prefix, flow=flow, known=known)
    has_table, has_stream = "clickhouse" in section.table, "stream" in section.table
    if has_table == has_stream:
        section.fail(None, 'needs exactly one of "clickhouse" (a table) or "stream"')
    if not has_table:
        for name in ("columns", "key"):
            if name in section.table:
                section.fail(name, "applies to clickhouse outputs only")
        return _stream_output(section, servers)
    for name in ("max_len", "dedup_window_s"):
        if name in section.table:
            section.fail(name, "applies to stream outputs only")
    when = _when(section)
    server = servers.pick(section, "clickhouse")
    table = section.get("clickhouse", str, check=table_name)
    columns = _identifiers(section, "columns")
    key = _identifiers(section, "key")
    if columns and (missing := [k for k in key if k not in columns]):
        section.fail("key", f"{missing} not among the written `columns`")
    database = servers.clickhouse[server].database
    qualified = table if "." in table else f"{database}.{table}"
    return ClickHouseOutput(table=qualified, when=when, columns=columns, key=key,
                            server=server)


def _stream_output(section: Section, servers: Servers) -> StreamOutput:
    return StreamOutput(
        stream=section.get("stream", str, check=non_empty),
        when=_when(section),
        max_len=section.get("max_len", int, None, positive),
        server=servers.pick(section, "redis"),
        dedup_window_s=section.get("dedup_window_s", int, StreamOutput("").dedup_window_s,
                                   positive),
    )


def read_stream_output(path: Path, owner: str, index: int, table: Any, servers: Servers, *,
                       kind: str) -> StreamOutput:
    """`[[KIND.to]]` that can only be a stream (a source's): a flow's stream output keys."""
    section = Section(path, table, prefix=f"to[{index}].", flow=owner, kind=kind,
                      known={"stream", "when", "max_len", "server"})
    if "stream" not in section.table:
        section.fail("stream", f"is required: a {kind} writes to streams only")
    return _stream_output(section, servers)


def _identifiers(section: Section, name: str) -> tuple[str, ...]:
    values = section.get(name, list, [])
    for i, value in enumerate(values):
        if not isinstance(value, str) or not IDENTIFIER.match(value):
            section.fail(f"{name}[{i}]", f"{value!r} is not a plain identifier")
    return tuple(values)


_FLOW_KEYS = {"name", "stream", "group", "handler", "batch", "flush_ms", "max_deliveries",
              "dead_letter", "delete_acked", "start_id", "max_entry_bytes", "cpu_bound",
              "max_in_flight", "options", "to", "server"}


def _flow(path: Path, index: int, table: Any, servers: Servers,
          handlers: Iterable[str] | None) -> FlowConfig:
    d = FlowConfig(name="", stream="", group="", handler="")
    name = table.get("name") if isinstance(table, dict) else None
    label = name if isinstance(name, str) and name else f"#{index + 1}"
    section = Section(path, table, prefix="", flow=label, known=_FLOW_KEYS)
    name = section.get("name", str, check=non_empty)
    handler = section.get("handler", str, check=non_empty)
    if handlers is not None and handler not in handlers:
        available = ", ".join(sorted(handlers)) or "none"
        section.fail("handler", f'no handler named "{handler}" in entry-point group '
                                f'"flowd.handlers" (installed: {available})')
    start_id = section.get("start_id", str, d.start_id)
    if start_id not in ("0", "$") and not re.fullmatch(r"\d+(-\d+)?", start_id):
        section.fail("start_id", f'{start_id!r} must be "0" (whole backlog), "$" (new entries '
                                 'only) or a stream id')
    targets = section.get("to", list, [])
    outputs = tuple(_output(path, name, i, t, servers) for i, t in enumerate(targets))
    server = servers.pick(section, "redis")
    if (stream := section.table.get("stream")) and any(
            isinstance(out, StreamOutput) and out.server == server and out.stream == stream
            for out in outputs):
        section.fail("to", f'writes to "{stream}", the stream the flow reads: it would read '
                           "its own output forever")
    return FlowConfig(
        server=server,
        name=name,
        stream=section.get("stream", str, check=non_empty),
        group=section.get("group", str, check=non_empty),
        handler=handler,
        batch=section.get("batch", int, d.batch, positive),
        flush_ms=section.get("flush_ms", int, d.flush_ms, non_negative),
        max_deliveries=section.get("max_deliveries", int, d.max_deliveries, positive),
        dead_letter=section.get("dead_letter", str, None, non_empty),
        delete_acked=section.get("delete_acked", bool, d.delete_acked),
        start_id=start_id,
        max_entry_bytes=section.get("max_entry_bytes", int, d.max_entry_bytes, positive),
        cpu_bound=section.get("cpu_bound", bool, None),
        max_in_flight=section.get("max_in_flight", int, d.max_in_flight, positive),
        options=dict(section.get("options", dict, {})),
        to=outputs,
    )


def _check_one_slot(path: Path, flow: FlowConfig) -> None:
    """Redis Cluster runs a MULTI only on keys of one slot, and a flow's commit (stream
    outputs, dead letters, the ack, its ledger) is one MULTI: all must share the stream's."""
    home = key_slot(flow.stream.encode())
    keys = [("dead_letter", flow.dead_letter)] + [
        (f"to[{i}].stream", out.stream) for i, out in enumerate(flow.to)
        if isinstance(out, StreamOutput) and not flow.is_remote(out)]
    for key, name in keys:
        if name is None or (slot := key_slot(name.encode())) == home:
            continue
        tag = hashed_part(flow.stream)
        tag = tag if tag != flow.stream else "hub"
        raise ConfigError(path, (
            f'"{name}" is in cluster slot {slot}, but the stream "{flow.stream}" is in slot '
            f"{home}: in Redis Cluster a flow's stream outputs, dead letters and ack are one "
            "MULTI, which needs every key in one slot. Give them a common hash tag (Redis "
            'hashes only the text between the first "{" and the next "}"), e.g. '
            f'stream = "{{{tag}}}.in", dead_letter = "{{{tag}}}.dead", '
            f'to = "{{{tag}}}.work"'), flow=flow.name, key=key)


def read_flows(path: Path, tables: list[Any], servers: Servers,
               handlers: Iterable[str] | None) -> tuple[FlowConfig, ...]:
    """Every [[flow]], each checked alone, then against the others."""
    flows = tuple(_flow(path, i, t, servers, handlers) for i, t in enumerate(tables))
    seen: set[str] = set()
    groups: dict[tuple[str, str, str], str] = {}
    for flow in flows:
        if flow.name in seen:
            raise ConfigError(path, "duplicate flow name (names must be unique)", flow=flow.name,
                              key="name")
        seen.add(flow.name)
        if (other := groups.get((flow.server, flow.stream, flow.group))) is not None:
            # Two flows in one group would split the stream's entries between them.
            raise ConfigError(path, f'stream "{flow.stream}" with group "{flow.group}" is '
                              f'already read by flow "{other}": use another group',
                              flow=flow.name, key="group")
        groups[(flow.server, flow.stream, flow.group)] = flow.name
        if servers.redis[flow.server].cluster:
            _check_one_slot(path, flow)
    return flows
