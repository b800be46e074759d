"""Clients for Redis and ClickHouse, built from config in one place.

The daemon and the command-line tools (status, dlq, send, graph) connect the same way,
with the same TLS options and the same secrets, so a setting that works for one works for
all of them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException

from flowd.core import embedded
from flowd.core.config import ClickHouseConfig, RedisConfig
from flowd.core.errors import ConfigurationError
from flowd.core.retry import AUTH_CLICKHOUSE_CODES
from flowd.core.secret import reveal, secret_names

__all__ = [
    "COMMAND_CONNECTIONS",
    "READ_CONNECTIONS",
    "ClickHouseAuthFailed",
    "clickhouse_client",
    "clickhouse_host",
    "client_name",
    "connect_redis",
    "connect_redis_sync",
    "read_pool",
    "redis_url",
    "safe_url",
]


def redis_url(config: RedisConfig) -> str:
    """The url to connect to: an `embedded://PATH` server is reached on its unix socket
    (started by flowd.core.embedded.ensure, by whichever flowd process needed it first)."""
    directory = embedded.data_dir(config.url)
    return config.url if directory is None else f"unix://{embedded.socket_path(directory)}"


def _redis_options(config: RedisConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"password": reveal(config.password),  # read here, at use
                               "socket_connect_timeout": 5}
    if config.url.startswith("rediss://"):
        options.update(ssl_ca_certs=config.ca_certs, ssl_certfile=config.certfile,
                       ssl_keyfile=config.keyfile)
    return options


# The daemon's connections to one Redis: commands (reads that do not block, commits, the
# ledger) share a pool that waits for a free connection rather than raising when all are
# busy; blocking reads (flowd.source.readmux) have their own, so a commit never waits behind one.
COMMAND_CONNECTIONS = 6
READ_CONNECTIONS = 3


def client_name(consumer: str, role: str = "") -> str:
    """The CLIENT SETNAME of the daemon's connections: `flowd:{consumer}`, then the role
    (Redis refuses spaces and control characters in a name)."""
    name = "".join(c if 32 < ord(c) < 127 else "_" for c in f"flowd:{consumer}")
    return f"{name}:{role}" if role else name


def _daemon_options(config: RedisConfig, name: str | None) -> dict[str, Any]:
    options: dict[str, Any] = dict(
        decode_responses=False,
        socket_timeout=30,  # well above the longest BLOCK flowd issues
        socket_keepalive=True,
        health_check_interval=15,
        **_redis_options(config),
    )
    if name:
        options["client_name"] = name
    if redis_url(config).startswith("unix://"):
        del options["socket_keepalive"]  # a TCP option: unix socket connections refuse it
    return options


def connect_redis(config: RedisConfig, *, name: str | None = None,
                  ) -> aioredis.Redis | AsyncRedisCluster:
    """The daemon's client. It never retries on its own: flowd's policy decides (retry.py).

    A retried write whose reply was lost could run twice (a MULTI's XADDs included), so the
    cluster client gets no retries either; it still follows MOVED/ASK redirections, which
    the server sends before running anything. A plain client holds at most
    COMMAND_CONNECTIONS connections, and a command waits for a free one. `name`: the
    connections' CLIENT SETNAME (see `client_name`).
    """
    options = _daemon_options(config, name)
    client: aioredis.Redis | AsyncRedisCluster
    if config.cluster:
        client = AsyncRedisCluster.from_url(redis_url(config), retry=AsyncRetry(NoBackoff(), 0),
                                            **options)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url(config), max_connections=COMMAND_CONNECTIONS, timeout=None,
            retry=AsyncRetry(NoBackoff(), 0), **options)
        client = aioredis.Redis.from_pool(pool)
    # The consumer parses these replies itself: redis-py would build a dict per entry.
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        client.set_response_callback(command, _raw_reply)
    return client


def read_pool(config: RedisConfig, address: tuple[str, int] | None = None, *,
              name: str | None = None) -> aioredis.BlockingConnectionPool:
    """The connections blocking reads use (flowd.source.readmux): to the configured server, or
    with `address` to that node of a cluster. At most READ_CONNECTIONS; a read waits for a
    free one."""
    url = redis_url(config)
    if address is not None:
        host, port = address
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]  # credentials in the url, if any
        host = f"[{host}]" if ":" in host else host
        url = f"{parts.scheme}://{user + '@' if user else ''}{host}:{port}"
    return aioredis.BlockingConnectionPool.from_url(
        url, max_connections=READ_CONNECTIONS, timeout=None,
        retry=AsyncRetry(NoBackoff(), 0), **_daemon_options(config, name))


def connect_redis_sync(config: RedisConfig, *, decode_responses: bool = True,
                       socket_timeout: float = 10, connect_timeout: float = 5,
                       ) -> redis.Redis | redis.RedisCluster:
    """A blocking client for the command-line tools (a cluster client with cluster = true:
    it sends each command to the node holding its key).

    A cluster client maps the slots as it is built, so an unreachable cluster raises
    redis.ConnectionError here already, as a plain client does at its first command.
    """
    options = {**_redis_options(config), "socket_connect_timeout": connect_timeout}
    if not config.cluster:
        return redis.Redis.from_url(redis_url(config), decode_responses=decode_responses,
                                    socket_timeout=socket_timeout, **options)
    try:
        return redis.RedisCluster.from_url(redis_url(config), decode_responses=decode_responses,
                                           socket_timeout=socket_timeout, **options)
    except RedisClusterException as exc:
        raise redis.ConnectionError(str(exc)) from exc


def clickhouse_client(config: ClickHouseConfig, *, only: str | None = None,
                      **settings: Any) -> Client:
    """A client that connects to `host`, or to the next of `alt_hosts` that accepts the
    connection (the driver rotates through them on a refused or timed-out connect and then
    stays on the one that answered); with `only` ("host:port"), to that server alone."""
    hosts = [only] if only is not None else list(config.hosts)
    first = urlsplit(f"//{hosts[0]}")
    alt_hosts = {"alt_hosts": ",".join(hosts[1:])} if len(hosts) > 1 else {}
    client = Client(
        host=first.hostname, port=first.port, database=config.database, user=config.user,
        password=reveal(config.password) or "", secure=config.secure,
        ca_certs=config.ca_certs, verify=bool(config.ca_certs) or config.secure,
        connect_timeout=config.connect_timeout,
        send_receive_timeout=config.send_receive_timeout, client_name="flowd",
        settings=settings, **alt_hosts,
    )
    _explain_refusals(client, config)
    return client


class ClickHouseAuthFailed(ch_errors.ServerException, ConfigurationError):
    """The server refused the login. Its message names the server, the user and where the
    password comes from, on one line, and never holds the password."""

    def __str__(self) -> str:
        return f"Code: {self.code}. {self.message}"


def _explain_refusals(client: Client, config: ClickHouseConfig) -> None:
    """Make the driver's refusals at connect say what to fix, naming the server.

    A refused login becomes ClickHouseAuthFailed (same code, so it is classified as
    before); a TLS certificate the CA does not vouch for gets the server and `ca_certs`
    named. Every other error is left as the driver raised it.
    """
    connection = client.connection
    connect = connection.connect

    def explained() -> Any:
        try:
            return connect()
        except ch_errors.ServerException as exc:
            if exc.code not in AUTH_CLICKHOUSE_CODES:
                raise
            # The driver tries hosts in turn only on a network error: the refusal came from
            # the first of its list.
            host, port = connection.hosts[0]
            raise ClickHouseAuthFailed(_auth_message(config, f"{host}:{port}", exc),
                                       code=exc.code) from None
        except ch_errors.NetworkError as exc:
            text = str(exc.message)
            if "CERTIFICATE_VERIFY_FAILED" not in text:
                raise
            where = config.ca_certs or "the system's CA store"
            raise ch_errors.NetworkError(
                f"TLS to ClickHouse refused: {text}; the server's certificate is not signed "
                f"by a CA in {where} (check [clickhouse] ca_certs)") from None

    connection.connect = explained


def _auth_message(config: ClickHouseConfig, where: str, exc: ch_errors.ServerException) -> str:
    env, credential = secret_names("clickhouse", config.name)
    reason = str(exc.message).split(" Stack trace:", 1)[0].strip().splitlines()
    said = reason[0].removeprefix("DB::Exception: ") if reason else f"code {exc.code}"
    password = reveal(config.password)
    if password:  # no server is known to echo it; if one does, it stops here
        said = said.replace(password, "***")
    fix = f"check {env} / credential {credential}" if password else \
        f"no password given: set {env} or credential {credential}"
    return f"authentication failed for user {config.user!r} at {where} ({said}); {fix}"


def clickhouse_host(client: Client) -> str | None:
    """The "host:port" a client is connected to now, written as in `ClickHouseConfig.hosts`."""
    connection = client.connection
    if not connection.connected or connection.host is None:
        return None
    host = connection.host
    return f"[{host}]:{connection.port}" if ":" in host else f"{host}:{connection.port}"


def _raw_reply(response: object, **options: object) -> object:
    return response


def safe_url(url: str) -> str:
    """The url with any password in it masked, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
