"""Handle: run a flow's handler on a batch, in the event loop or the process pool.

Guarantees: a handler that raises on a batch does not fail the entries it did not fail on:
the batch is split in halves until the entries it raises on are found, and those alone are
held back (pending, retried later; after `max_deliveries`, dead-lettered with the error).
A failure no entry is to blame for (the pool died, a server went away) fails the whole
batch, which then stays pending.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

import structlog
from cachetools import LRUCache

from flowd.core.config import FlowConfig
from flowd.core.retry import describe, is_transient
from flowd.pipeline.fate import bisect, handler_raised
from flowd.plugin.decode import Decoded
from flowd.plugin.discovery import LoadedHandler
from flowd.plugin.handler import Outcome
from flowd.plugin.pool import CpuPool

__all__ = ["Handling"]

log = structlog.get_logger(__name__)


class Handling:
    def __init__(self, flow: FlowConfig, handler: LoadedHandler, pool: CpuPool) -> None:
        self.flow, self.handler, self.pool = flow, handler, pool
        # The last handler error of each entry held back, for its eventual dead letter.
        self.last_errors: LRUCache[str, str] = LRUCache(maxsize=10_000)
        self._log = log.bind(flow=flow.name, stream=flow.stream)

    async def run(self, batch: Decoded) -> tuple[Outcome, dict[str, str]]:
        """The handler's outcome, and the entries held back → why (flowd.pipeline.fate)."""
        results = await bisect(batch, lambda part: len(part.live), _halves, self._attempt,
                               self._hold, lambda exc: not _is_infrastructure(exc))
        held: dict[str, str] = {}
        for _, part in results:
            held |= part
        return Outcome.concat([outcome for outcome, _ in results]), held

    async def _attempt(self, batch: Decoded) -> tuple[Outcome, dict[str, str]]:
        return await self._call(batch), {}

    async def _hold(self, batch: Decoded, exc: Exception) -> tuple[Outcome, dict[str, str]]:
        entry_id = batch.live[0][0]
        reason = handler_raised(self.flow.handler, exc)
        self.last_errors[entry_id] = reason
        self._log.warning("handler failed on an entry; holding it back",
                          id=entry_id, error=describe(exc))
        return Outcome.empty(), {entry_id: reason}

    async def _call(self, batch: Decoded) -> Outcome:
        if not batch.live:
            return Outcome.empty()
        if self.handler.cpu_bound:
            return await self.pool.run(self.flow.handler, self.flow.options, batch)
        return self.handler.run(batch)


def _halves(batch: Decoded) -> tuple[Decoded, Decoded]:
    middle = len(batch.live) // 2
    return Decoded(batch.live[:middle]), Decoded(batch.live[middle:])


def _is_infrastructure(exc: BaseException) -> bool:
    """A failure no entry is to blame for (the pool died, a server went away)."""
    return isinstance(exc, BrokenProcessPool) or is_transient(exc)
