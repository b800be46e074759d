"""The daemon's `[[source]]` and `[[move]]` runners (flowd.sync): started with the daemon,
stopped with it, and replaced on a reload when their config changed (a run in hand finishes
its step first: the state in Redis says where it is, so the new runner goes on from there).
A move's flow on its via stream is an ordinary flow of the config (`move:NAME`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog

from flowd.core.config import MoveConfig, SourceConfig
from flowd.daemon.network import Network
from flowd.source.liveness import Liveness
from flowd.sync.move import MoveRunner
from flowd.sync.runner import Scheduled
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
        self.runners: dict[str, Scheduled] = {}  # by "source:NAME" / "move:NAME"
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def add(self, job: SourceConfig | MoveConfig) -> None:
        network = self._network
        runner: Scheduled
        if isinstance(job, SourceConfig):
            runner = SourceRunner(job, redis=network.redis(job.redis_server),
                                  clickhouse=network.writer(job.server), owner=self._owner,
                                  stopping=asyncio.Event(), liveness=self._liveness,
                                  interval_s=self._interval_s)
        else:
            runner = MoveRunner(job, redis=network.redis(""), hot=network.writer(job.server),
                                cold=network.writer(job.to.server), owner=self._owner,
                                stopping=asyncio.Event(), liveness=self._liveness,
                                interval_s=self._interval_s)
        name = f"{runner.kind}:{job.name}"
        self.runners[name] = runner
        self.tasks[name] = asyncio.create_task(runner.run(), name=name)

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.stopping.set()

    async def apply(self, jobs: Iterable[SourceConfig | MoveConfig], timeout: float) -> None:
        """A reload: stop the runners whose config changed or went, start the new ones."""
        new = {f"{'source' if isinstance(job, SourceConfig) else 'move'}:{job.name}": job
               for job in jobs}
        old = {name: _config(runner) for name, runner in self.runners.items()}
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
            log.info("sources and moves reloaded", added=sorted(set(new) - set(old)),
                     removed=sorted(set(old) - set(new)),
                     changed=sorted(set(retiring) & set(new)))

    def record(self) -> dict[str, Any]:
        """What the registry publishes about them, by "source:NAME" / "move:NAME"."""
        return {name: {"state": runner.state, "rows": runner.stats.rows,
                       "written": runner.stats.written, "runs": dict(runner.stats.runs)}
                for name, runner in self.runners.items()}


def _config(runner: Scheduled) -> SourceConfig | MoveConfig:
    return runner.source if isinstance(runner, SourceRunner) else runner.move  # type: ignore[attr-defined]
