"""Clients for Redis and ClickHouse, built from config in one place.

The daemon and the command-line tools (status, dlq, send, graph) connect the same way,
with the same TLS options and the same secrets, so a setting that works for one works for
all of them.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from clickhouse_driver import Client
from redis.backoff import NoBackoff
from redis.retry import Retry

from flowd.config import ClickHouseConfig, RedisConfig

__all__ = ["clickhouse_client", "connect_redis", "connect_redis_sync"]


def _redis_options(config: RedisConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"password": config.password, "socket_connect_timeout": 5}
    if config.url.startswith("rediss://"):
        options.update(ssl_ca_certs=config.ca_certs, ssl_certfile=config.certfile,
                       ssl_keyfile=config.keyfile)
    return options


def connect_redis(config: RedisConfig) -> aioredis.Redis:
    """The daemon's client. It never retries on its own: flowd's policy decides (retry.py)."""
    client = aioredis.Redis.from_url(
        config.url,
        decode_responses=False,
        socket_timeout=30,  # well above the longest BLOCK flowd issues
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(NoBackoff(), 0),
        **_redis_options(config),
    )
    # The consumer parses these replies itself: redis-py would build a dict per entry.
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        client.set_response_callback(command, _raw_reply)
    return client


def connect_redis_sync(config: RedisConfig, *, decode_responses: bool = True) -> redis.Redis:
    """A blocking client for the command-line tools."""
    return redis.Redis.from_url(config.url, decode_responses=decode_responses,
                                socket_timeout=10, **_redis_options(config))


def clickhouse_client(config: ClickHouseConfig, **settings: Any) -> Client:
    return Client(
        host=config.host, port=config.port, database=config.database, user=config.user,
        password=config.password, secure=config.secure, ca_certs=config.ca_certs,
        verify=bool(config.ca_certs) or config.secure, connect_timeout=config.connect_timeout,
        send_receive_timeout=config.send_receive_timeout, client_name="flowd",
        settings=settings,
    )


def _raw_reply(response: object, **options: object) -> object:
    return response
