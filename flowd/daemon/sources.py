"""The daemon's `[[source]]` runners (flowd.sync.source): started with the daemon, stopped
with it, and replaced on a reload when their config changed (a run in hand finishes its
batch first: the cursor is where its rows are, so the new runner reads on from there)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog

from flowd.core.config import SourceConfig
from flowd.daemon.network import Network
from flowd.source.liveness import Liveness
from flowd.sync.source import SourceRunner

__all__ = ["Sources"]

log = structlog.get_logger(__name__)


class Sources:
    def __init__(self, network: Network, owner: str, *, liveness: Liveness,
                 interval_s: float) -> None:
        self._network = network
        self._liveness = liveness
        self._owner = owner
        self._interval_s = interval_s
        self.runners: dict[str, SourceRunner] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def add(self, source: SourceConfig) -> None:
        runner = SourceRunner(source, redis=self._network.redis(source.redis_server),
                              clickhouse=self._network.writer(source.server), owner=self._owner,
                              stopping=asyncio.Event(), liveness=self._liveness,
                              interval_s=self._interval_s)
        self.runners[source.name] = runner
        self.tasks[source.name] = asyncio.create_task(runner.run(), name=f"source:{source.name}")

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.stopping.set()

    async def apply(self, sources: Iterable[SourceConfig], timeout: float) -> None:
        """A reload: stop the runners whose config changed or went, start the new ones."""
        new = {source.name: source for source in sources}
        old = {name: runner.source for name, runner in self.runners.items()}
        retiring = [name for name, source in old.items() if new.get(name) != source]
        for name in retiring:
            self.runners[name].stopping.set()
        if retiring:
            await asyncio.wait([self.tasks[name] for name in retiring], timeout=timeout)
        for name in retiring:
            self.runners.pop(name)
            task = self.tasks.pop(name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for name, source in new.items():
            if name not in self.runners:
                self.add(source)
        if retiring or set(new) - set(old):
            log.info("sources reloaded", added=sorted(set(new) - set(old)),
                     removed=sorted(set(old) - set(new)),
                     changed=sorted(set(retiring) & set(new)))

    def record(self) -> dict[str, Any]:
        """What the registry publishes about them."""
        return {name: {"state": runner.state, "rows": runner.stats.rows,
                       "written": runner.stats.written, "runs": dict(runner.stats.runs)}
                for name, runner in self.runners.items()}
