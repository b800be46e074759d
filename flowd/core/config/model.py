"""The config as flowd holds it: frozen dataclasses, one per section of config.toml.

Nothing here reads a file or checks a value (flowd.core.config does, once, at load); every
other module receives these objects already valid and cannot change them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flowd.core.secret import SecretRef

__all__ = [
    "EMBEDDED",
    "EVERY_COLUMN",
    "ClickHouseConfig",
    "ClickHouseOutput",
    "Config",
    "DaemonConfig",
    "FlowConfig",
    "HttpConfig",
    "HttpToken",
    "MoveConfig",
    "Output",
    "RedisConfig",
    "SourceConfig",
    "StreamOutput",
    "host_port",
    "listen_address",
]

EMBEDDED = "embedded://"  # [redis] url scheme: flowd runs the server itself (flowd.core.embedded)
# A table output's `key` meaning "a row is the values of all its columns" (a move's own flow;
# not a key a config can write): a replayed row is looked for by every column that has no
# NULL among the rows looked for (flowd.clickhouse.replay).
EVERY_COLUMN = ("*",)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    name: str = ""  # "" for [redis], NAME for [redis.NAME]
    # Where the password is kept, read at connect (flowd.core.secret.reveal); None: no password.
    password: SecretRef | None = None
    ca_certs: str | None = None  # rediss:// only: CA bundle, client certificate and key
    certfile: str | None = None
    keyfile: str | None = None
    cluster: bool = False  # Redis Cluster: `url` names one node, the others are discovered


@dataclass(frozen=True, slots=True)
class ClickHouseConfig:
    host: str = "127.0.0.1"
    name: str = ""  # "" for [clickhouse], NAME for [clickhouse.NAME]
    port: int = 9000
    database: str = "default"
    user: str = "default"
    password: SecretRef | None = None  # where it is kept, read at connect (flowd.core.secret)
    secure: bool = False
    ca_certs: str | None = None
    connect_timeout: float = 10.0
    send_receive_timeout: float = 300.0
    # Other servers with the same tables, tried in order when the current one refuses
    # connections: "host:port" each (a bare host takes `port`).
    alt_hosts: tuple[str, ...] = ()
    engine: str = "clickhouse"  # "clickhouse" (a server) or "chdb" (in-process, on `path`)
    path: str | None = None  # chdb only: its data directory, absolute once loaded

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every server, `host` first, as "host:port"."""
        return (host_port(self.host, self.port), *self.alt_hosts)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    consumer: str = "{hostname}-{pid}"
    cpu_workers: int = 2
    claim_idle_ms: int = 60_000
    shutdown_timeout: float = 30.0
    metrics: str = "127.0.0.1:9464"
    log_level: str = "info"
    processes: int = 1  # daemon processes, each its own consumer in every group
    control_interval_s: float = 0.5  # how often the flows' desired state is read
    registry_ttl_s: float = 15.0  # the daemon's registry record expires this long after

    def consumer_name(self) -> str:
        return self.consumer.format(hostname=socket.gethostname(), pid=os.getpid())

    def metrics_address(self) -> tuple[str | None, int] | None:
        """(host, port) to serve /metrics and /healthz on; host None: every interface;
        None: metrics are off."""
        return listen_address(self.metrics) if self.metrics else None


@dataclass(frozen=True, slots=True)
class HttpToken:
    """A bearer token of the HTTP API. Its value is read only when the HTTP server starts
    (flowd.http.auth.resolve): every other command works without it."""

    name: str
    secret: SecretRef  # where its value is kept: FLOWD_HTTP_TOKEN_NAME / http-token-NAME
    streams: tuple[str, ...] = ()  # the streams it may post to; "*": any
    control: bool = False  # may pause/resume/drain flows and replay/purge dead letters
    read: bool = False  # may read message data (dead letters); control may too

    @property
    def may_read(self) -> bool:
        return self.read or self.control


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """`[http]`: the daemon's one HTTP address (`[daemon] metrics` is its older name)."""

    listen: str = "127.0.0.1:9464"
    ingest: bool = True  # POST /v1/streams/...; off when only [daemon] metrics is set
    max_body_bytes: int = 10 * 1024 * 1024
    body_timeout_s: float = 10.0  # a request body not received in this time: 408
    idempotency_window_s: int = 24 * 3600
    any_stream: bool = False  # accept streams no flow reads or writes
    tokens: tuple[HttpToken, ...] = ()


@dataclass(frozen=True, slots=True)
class ClickHouseOutput:
    table: str  # "db.table" once loaded
    when: Mapping[str, str] = field(default_factory=dict)
    columns: tuple[str, ...] = ()  # empty: every column the table has
    key: tuple[str, ...] = ()  # columns identifying a row: replays are checked by them
    server: str = ""  # the [clickhouse.NAME] holding the table; "": [clickhouse]

    @property
    def label(self) -> str:
        return f"clickhouse:{self.target}"

    @property
    def target(self) -> str:
        """The table and its server, unique within a config: what the ledger records
        outcomes under ("db.table", or "db.table@NAME" on a named server)."""
        return f"{self.table}@{self.server}" if self.server else self.table


@dataclass(frozen=True, slots=True)
class StreamOutput:
    stream: str
    when: Mapping[str, str] = field(default_factory=dict)
    max_len: int | None = None
    server: str = ""  # the [redis.NAME] holding the stream; "": [redis]
    # A stream on another Redis than the flow's: how long its server remembers a written
    # batch's token, so a replay of that batch adds nothing (see flowd.copy).
    dedup_window_s: int = 7 * 24 * 3600

    @property
    def label(self) -> str:
        return f"stream:{self.target}"

    @property
    def target(self) -> str:
        return f"{self.stream}@{self.server}" if self.server else self.stream


Output = ClickHouseOutput | StreamOutput


@dataclass(frozen=True, slots=True)
class FlowConfig:
    name: str
    stream: str
    group: str
    handler: str
    batch: int = 5000  # ClickHouse wants few, large inserts; see bench/README.md
    flush_ms: int = 100
    max_deliveries: int = 5
    dead_letter: str | None = None
    delete_acked: bool = True
    start_id: str = "0"
    max_entry_bytes: int = 8 * 1024 * 1024  # bigger entries are dead-lettered, not loaded
    cpu_bound: bool | None = None  # None: as the handler declares; true: run in the pool
    max_in_flight: int = 4  # batches handled at once (read the next while others are inserted)
    options: Mapping[str, Any] = field(default_factory=dict)
    to: tuple[Output, ...] = ()
    server: str = ""  # the [redis.NAME] the flow reads; "": [redis]

    def is_remote(self, out: Output) -> bool:
        """A stream output on another Redis than the one this flow reads."""
        return isinstance(out, StreamOutput) and out.server != self.server


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """`[[source]]`: rows of a ClickHouse table (or query) into streams, in cursor order, on
    a schedule (flowd.sync)."""

    name: str
    cursor: tuple[str, ...]  # columns increasing as a tuple: each run reads the rows after
    table: str | None = None  # key `clickhouse`: "db.table" once loaded; or `query`
    query: str | None = None
    server: str = ""  # the [clickhouse.NAME] read; "": [clickhouse]
    every: float | None = None  # seconds between runs; or `cron`
    cron: str | None = None
    batch: int = 10_000  # rows per read, and per server-side call that writes them
    to: tuple[StreamOutput, ...] = ()  # all on one Redis, which keeps the cursor
    reread: float | None = None  # seconds: late rows this far behind the cursor are sent too

    @property
    def redis_server(self) -> str:
        """The Redis holding the source's streams, cursor and desired state."""
        return self.to[0].server if self.to else ""


@dataclass(frozen=True, slots=True)
class MoveConfig:
    """`[[move]]`: old partitions of a table moved to a table on another server through a
    stream, each dropped from `server` only once the other holds it, verified
    (flowd.sync.move)."""

    name: str
    table: str  # "db.table" on `server`
    to: ClickHouseOutput  # key `to`: { clickhouse, server }
    older_than: float  # seconds: partitions whose newest row is older than this move
    via: str  # the stream the rows pass through (on [redis])
    server: str = ""
    every: float | None = None
    cron: str | None = None
    batch: int = 10_000


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    redis: RedisConfig
    clickhouse: ClickHouseConfig
    daemon: DaemonConfig
    flows: tuple[FlowConfig, ...]
    http: HttpConfig = field(default_factory=HttpConfig)
    # [redis.NAME] and [clickhouse.NAME] sections, by NAME.
    redis_servers: Mapping[str, RedisConfig] = field(default_factory=dict)
    clickhouse_servers: Mapping[str, ClickHouseConfig] = field(default_factory=dict)
    sources: tuple[SourceConfig, ...] = ()
    moves: tuple[MoveConfig, ...] = ()

    def redis_for(self, server: str) -> RedisConfig:
        """The Redis named `server` ("": the unnamed [redis])."""
        return self.redis_servers[server] if server else self.redis

    def clickhouse_for(self, server: str) -> ClickHouseConfig:
        return self.clickhouse_servers[server] if server else self.clickhouse

    def redis_names(self) -> list[str]:
        """Every Redis a flow of this config reads or writes, "" for the unnamed one."""
        names = {flow.server for flow in self.flows} | {
            out.server for flow in self.flows for out in flow.to
            if isinstance(out, StreamOutput)} | {
            source.redis_server for source in self.sources}
        return sorted(names | {""})

    def clickhouse_names(self) -> list[str]:
        """Every ClickHouse a table output names, "" for the unnamed one (always there:
        the daemon checks it is up and `flowd query` asks it)."""
        return sorted({out.server for flow in self.flows for out in flow.to
                       if isinstance(out, ClickHouseOutput)} | {
            source.server for source in self.sources} | {
            move.server for move in self.moves} | {""})

    def flow(self, name: str) -> FlowConfig:
        for flow in self.flows:
            if flow.name == name:
                return flow
        raise KeyError(name)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_address(value: str) -> tuple[str | None, int]:
    """"host:port", "[v6 address]:port" or ":port" (every interface)."""
    try:
        url = urlsplit(f"//{value.strip()}")
        host, port = url.hostname, url.port
    except ValueError as exc:
        raise ValueError(f'{value!r} must be "host:port" (or "" to turn metrics off): '
                         f"{exc}") from None
    if port is None or port == 0 or url.path or url.query or url.username or url.password:
        raise ValueError(f'{value!r} must be "host:port" with a port from 1 to 65535 '
                         '(or "" to turn metrics off)')
    return host or None, port
