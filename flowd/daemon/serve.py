"""`flowd serve`: the HTTP side alone, for a host that runs no flows.

The same API as the daemon's address (POST /v1/streams/{stream}, /metrics, /healthz,
/openapi.json), with the same config; it reads and writes no consumer group. Signal
handlers only flip state; the loop winds down in one place.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from flowd.core.config import Config
from flowd.core.connections import connect_redis
from flowd.core.retry import describe
from flowd.http.ingest import Ingest
from flowd.http.metrics import CHECK_TIMEOUT, Endpoint

__all__ = ["HttpOnly"]

log = structlog.get_logger(__name__)


class HttpOnly(Endpoint):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.stopping = asyncio.Event()
        self.ingest = Ingest(config, connect_redis(config.redis, name="flowd:serve"))

    def run(self) -> int:
        import uvloop

        return uvloop.run(self.main())

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.start(ingest=self.ingest)
            log.info("flowd serve ready", address=self.address)
            await self.stopping.wait()
        finally:
            await self.close()
        return 0

    async def metrics(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def health(self) -> tuple[bool, dict[str, str]]:
        try:
            await asyncio.wait_for(self.ingest.redis.ping(), CHECK_TIMEOUT)
        except Exception as exc:
            return False, {"redis": describe(exc)}
        return True, {"redis": "ok"}
