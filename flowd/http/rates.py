"""The console's throughput history: each flow's rate, sampled by the serving daemon.

What this module guarantees: from the HTTP server's start until it closes, every
RATE_EVERY_S one sample per flow (unix time, entries acked per second, or None when the
registry could not be read), the last RATE_HISTORY_S of them kept; a failed read is a None
sample, never the end of the sampling.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from flowd.core.retry import describe

__all__ = ["RATE_EVERY_S", "RATE_HISTORY_S", "RateHistory"]

log = structlog.get_logger(__name__)

RATE_EVERY_S = 5.0  # a registry record's rates change at its refresh, every ttl/3 (5 s)
RATE_HISTORY_S = 300.0  # what the console's throughput chart spans

Read = Callable[[], Awaitable[dict[str, float | None]]]


class RateHistory:
    def __init__(self, flows: list[str], read: Read) -> None:
        self._read = read
        self._samples: dict[str, deque[tuple[float, float | None]]] = {
            name: deque(maxlen=int(RATE_HISTORY_S / RATE_EVERY_S)) for name in flows}
        self._task: asyncio.Task[None] | None = None

    async def start(self, *_: Any) -> None:
        """Start sampling (an aiohttp on_startup hook, hence the ignored app)."""
        self._task = asyncio.create_task(self._run(), name="console-rates")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                rates = await self._read()
            except Exception as exc:  # the next sample tries again
                log.debug("console: cannot sample the rates", error=describe(exc))
                rates = {}
            now = round(time.time(), 3)
            for name, samples in self._samples.items():
                samples.append((now, rates.get(name)))
            await asyncio.sleep(RATE_EVERY_S)

    def as_json(self) -> dict[str, Any]:
        return {"every_s": RATE_EVERY_S, "history_s": RATE_HISTORY_S,
                "flows": {name: [list(sample) for sample in samples]
                          for name, samples in self._samples.items()}}
