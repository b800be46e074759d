"""The daemon's connections to every server its config names, by server name.

One Redis client per Redis server (the unnamed `[redis]` is ""), one shared blocking read
(flowd.source.readmux) per server a flow reads, one writer per ClickHouse server. Everything is
made on first use, so a named server no flow uses costs nothing, and a flow added by a
reload finds its servers; an embedded:// server is started (by this process) when first
used, as the daemon starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

import redis.asyncio as aioredis
import structlog

from flowd.clickhouse.chdb import writer_for
from flowd.clickhouse.writer import ClickHouseWriter
from flowd.core import embedded
from flowd.core.config import Config
from flowd.core.connections import client_name, connect_redis, read_pool
from flowd.source.readmux import ReadMux

__all__ = ["Network"]

log = structlog.get_logger(__name__)


class Network:
    def __init__(self, config: Config, consumer: str) -> None:
        self.config = config
        self.consumer = consumer
        self._redis: dict[str, aioredis.Redis] = {}
        self._muxes: dict[str, ReadMux] = {}
        self._writers: dict[str, ClickHouseWriter] = {}
        self._embedded: list[embedded.EmbeddedRedis] = []  # servers this process started

    def redis(self, server: str) -> aioredis.Redis:
        client = self._redis.get(server)
        if client is None:
            config = self.config.redis_for(server)
            if (started := embedded.ensure(config)) is not None:  # it dies with us
                self._embedded.append(started)
            client = self._redis[server] = connect_redis(
                config, name=client_name(self.consumer))
        return client

    def mux(self, server: str) -> ReadMux:
        """The blocking read the idle flows reading `server` share."""
        mux = self._muxes.get(server)
        if mux is None:
            mux = self._muxes[server] = ReadMux(self.redis(server), functools.partial(
                read_pool, self.config.redis_for(server),
                name=client_name(self.consumer, "read")))
        return mux

    def writer(self, server: str) -> ClickHouseWriter:
        writer = self._writers.get(server)
        if writer is None:
            writer = self._writers[server] = writer_for(self.config.clickhouse_for(server))
        return writer

    def writers(self) -> dict[str, ClickHouseWriter]:
        """A writer for every ClickHouse server the config defines (each connects when
        first used)."""
        return {name: self.writer(name) for name in ["", *self.config.clickhouse_servers]}

    def remotes(self, server: str) -> dict[str, aioredis.Redis]:
        """Clients of every Redis server the config defines but `server`."""
        return {name: self.redis(name) for name in ["", *self.config.redis_servers]
                if name != server}

    def forget_schemas(self) -> None:
        for writer in self._writers.values():
            writer.forget_schema()

    async def ping(self) -> None:
        """Every Redis a flow reads and every ClickHouse it writes answers (a stream on
        another Redis is not waited for: its batches wait, with back-off, instead)."""
        for server in sorted({flow.server for flow in self.config.flows} | {""}):
            await self.redis(server).ping()
        for server in self.config.clickhouse_names():
            await self.writer(server).ping()

    async def close(self) -> None:
        for mux in self._muxes.values():
            await mux.close()
        for client in self._redis.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        for writer in self._writers.values():
            await asyncio.to_thread(writer.close)
        for server in self._embedded:
            await asyncio.to_thread(server.stop)
