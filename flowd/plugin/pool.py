"""The process pool for `cpu_bound` handlers.

A batch is split into one part per pool process, so every process works on every batch
(a handler sees "up to `batch` messages" either way: flowd also splits a failing batch).
Plain built-in data crosses the process boundary, and each pool process loads the handler
by its entry-point name, so nothing from the wire is pickled.

The pool dies with the daemon, even a SIGKILLed one: the forkserver is killed when the
daemon's main thread ends (flowd.plugin._forkserver), and every pool process when the forkserver
does (flowd.core.lifeline). A batch a pool process was working on is not acked, so it is read
again by the next daemon.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import structlog

from flowd.core import gctune, lifeline
from flowd.core.columns import Columns
from flowd.plugin.decode import Decoded
from flowd.plugin.discovery import run_in_worker
from flowd.plugin.handler import Outcome

__all__ = ["CpuPool"]

log = structlog.get_logger(__name__)

# Below this many messages per part, another round trip to a pool process costs more than
# the work it would share.
MIN_PART = 64


class CpuPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # forkserver: forking a process that runs threads (ClickHouse clients) and an
            # event loop is unsafe; the server process is forked before any of those exist.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["flowd.plugin._forkserver"])
            # Started here, by the loop's (main) thread: the forkserver dies with that thread.
            multiprocessing.forkserver.ensure_running()
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                                 initializer=_start_pool_process,
                                                 initargs=(os.getpid(),))
        return self._executor

    async def run(self, handler: str, options: Mapping[str, Any],
                  batch: Decoded) -> Outcome:
        entries = batch.live
        frozen_options = tuple(sorted(options.items()))
        loop = asyncio.get_running_loop()
        pool = self._pool()
        parts = max(1, min(self.workers, len(entries) // MIN_PART))
        size = max(1, -(-len(entries) // parts))
        submitted: list[asyncio.Future[Any]] = []
        try:
            # A pool that broke while idle (a process killed between batches) refuses the
            # submission itself, so this is where it must be noticed too.
            for start in range(0, len(entries), size):
                submitted.append(loop.run_in_executor(
                    pool, run_in_worker, handler, frozen_options, entries[start:start + size]))
        except BrokenProcessPool:
            for future in submitted:
                future.cancel()
            self._discard_broken(pool, handler)
            raise
        results = await asyncio.gather(*submitted, return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        broken = [failure for failure in failures if isinstance(failure, BrokenProcessPool)]
        if broken:
            self._discard_broken(pool, handler)
            raise broken[0]
        if failures:
            raise failures[0]
        # Parts in batch order, so records keep the order of their entries.
        return Outcome(Columns.concat([Columns(ids, data) for ids, data, _ in results]),
                       [rejection for _, _, rejections in results for rejection in rejections])

    def _discard_broken(self, pool: ProcessPoolExecutor, handler: str) -> None:
        """A pool process died (OOM killer, kill -9): the next batch gets a fresh pool; the
        failed batch was not acked and is retried by the caller."""
        pool.shutdown(wait=False, cancel_futures=True)
        if self._executor is pool:  # not one another batch has already put in its place
            log.error("process pool broken; rebuilding it", handler=handler)
            self._executor = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _start_pool_process(daemon: int) -> None:
    """First thing in each pool process: be killed when the forkserver that forked it dies
    (it dies with the daemon). A forkserver that died before that was set is noticed:
    the parent is no longer a child of the daemon."""
    lifeline.die_with_parent()
    if lifeline.parent_of(os.getppid()) != daemon:
        os._exit(1)
    gctune.tune()
