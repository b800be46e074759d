"""The daemon's lifecycle: start every flow, run until told to stop, drain, close.

Signal handlers only flip state; the loop notices and winds down in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time

import redis.asyncio as aioredis
import structlog

from flowd import plugins
from flowd.clickhouse import ClickHouseWriter
from flowd.config import Config
from flowd.connections import connect_redis
from flowd.consumer import FlowConsumer
from flowd.pool import CpuPool

__all__ = ["Worker"]

log = structlog.get_logger(__name__)


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.consumer_name = config.daemon.consumer_name()
        self.stopping = asyncio.Event()
        self.consumers: dict[str, FlowConsumer] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._redis: aioredis.Redis | None = None
        self._clickhouse: ClickHouseWriter | None = None
        self._pool: CpuPool | None = None
        # Fault injection for the fault suite: the probability of SIGKILLing this process
        # right after a ClickHouse insert and before its ack. Off unless set.
        self._crash_after_insert = float(os.environ.get("FLOWD_FAULT_CRASH_AFTER_INSERT", 0))

    # -- entry points ------------------------------------------------------------------
    def run(self) -> int:
        """Run until SIGTERM/SIGINT; the process's exit code."""
        import uvloop

        return uvloop.run(self.main())

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
            await self.stopping.wait()
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.close()
        return 0

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: finishing batches in flight",
                     timeout_s=self.config.daemon.shutdown_timeout)
            self.stopping.set()

    # -- phases ------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        self._redis = connect_redis(config.redis)
        self._clickhouse = ClickHouseWriter(config.clickhouse)
        self._pool = CpuPool(config.daemon.cpu_workers)
        for flow in config.flows:
            handler = plugins.load(flow.handler, flow.options)
            if flow.cpu_bound is not None:
                handler = dataclasses.replace(handler, cpu_bound=flow.cpu_bound)
            consumer = FlowConsumer(
                flow, redis=self._redis, clickhouse=self._clickhouse, cpu_pool=self._pool,
                handler=handler, consumer=self.consumer_name,
                claim_idle_ms=config.daemon.claim_idle_ms, stopping=self.stopping,
                crash_after_insert=self._crash_after_insert)
            self.consumers[flow.name] = consumer
            self._tasks[flow.name] = asyncio.create_task(consumer.run(), name=f"flow:{flow.name}")
        log.info("flowd started", consumer=self.consumer_name, config=config.path,
                 flows=[flow.name for flow in config.flows])

    async def drain(self) -> None:
        """Let every flow finish its batch in hand, up to `shutdown_timeout`."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        started = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=self.config.daemon.shutdown_timeout)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("flow ended with an error", flow=task.get_name(), error=repr(exc))
        if pending:
            log.warning("shutdown timeout: abandoning batches in flight (they stay pending)",
                        flows=[task.get_name() for task in pending])
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        log.info("drained", seconds=round(time.monotonic() - started, 2))

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._redis is not None:
            await self._forget_idle_consumer()
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        if self._clickhouse is not None:
            await asyncio.to_thread(self._clickhouse.close)
        if self._pool is not None:
            await asyncio.to_thread(self._pool.close)
        log.info("flowd stopped",
                 totals={name: c.stats.acked for name, c in self.consumers.items()})

    async def _forget_idle_consumer(self) -> None:
        """Remove our consumer name from each group when it holds nothing pending.

        Consumer names carry the pid, so without this every restart would leave one more
        name in XINFO CONSUMERS.
        """
        for consumer in self.consumers.values():
            flow = consumer.flow
            with contextlib.suppress(Exception):
                summary = await self._redis.xpending_range(
                    flow.stream, flow.group, min="-", max="+", count=1,
                    consumername=self.consumer_name)
                if not summary:
                    await self._redis.xgroup_delconsumer(flow.stream, flow.group,
                                                         self.consumer_name)
