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
from collections.abc import Coroutine, Iterable
from typing import Any

import structlog

import flowd
from flowd.admin.registry import Registry
from flowd.core import config as config_module
from flowd.core.config import Config, FlowConfig, StreamOutput
from flowd.core.connections import client_name, connect_redis
from flowd.core.errors import ConfigError, PluginError
from flowd.core.retry import Backoff, describe, needs_operator
from flowd.core.states import RUNNING
from flowd.daemon.control import Control
from flowd.daemon.network import Network
from flowd.daemon.sources import Sources
from flowd.daemon.systemd import Notifier
from flowd.http.ingest import Ingest
from flowd.http.metrics import MetricsServer
from flowd.pipeline.consumer import FlowConsumer
from flowd.plugin import discovery as plugins
from flowd.plugin.discovery import LoadedHandler
from flowd.plugin.pool import CpuPool
from flowd.source.liveness import Liveness, process_identity

__all__ = ["Worker"]

REGISTRY_FIRST_REFRESH_S = 2.0

log = structlog.get_logger(__name__)

STATUS_INTERVAL_S = 5.0  # how often STATUS= is refreshed for `systemctl status`


class Worker:
    def __init__(self, config: Config, *, process_index: int = 0,
                 metrics_socket: str | None = None) -> None:
        self.config = config
        self.process_index = process_index  # which of [daemon] processes this one is
        self.metrics_socket = metrics_socket  # under a supervisor, which serves the address
        self.consumer_name = config.daemon.consumer_name()
        self.stopping = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.notifier = Notifier()
        self._heartbeat: asyncio.Task[None] | None = None
        self.consumers: dict[str, FlowConsumer] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._network: Network | None = None  # every server's connections, by name
        self.sources: Sources | None = None  # the [[source]] runners
        self._pool: CpuPool | None = None
        self._metrics: MetricsServer | None = None
        self.control: Control | None = None  # the flows' desired state, followed
        self.registry: Registry | None = None  # this daemon's record
        self._liveness: Liveness | None = None  # which other daemons are known dead
        self._housekeeping: list[asyncio.Task[None]] = []
        self._rates = _Rates()
        # Handler name → the version a `pip install` put on disk since this process imported
        # it (seen at the last SIGHUP): it runs only after a restart.
        self._on_disk: dict[str, str] = {}
        # Fault injection for the fault suite: the probability of SIGKILLing this process
        # right after a ClickHouse insert and before its ack. Off unless set.

    # -- entry points ------------------------------------------------------------------
    def run(self) -> int:
        """Run until SIGTERM/SIGINT; the process's exit code."""
        import uvloop

        return uvloop.run(self.main())

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        try:
            await self.start()
            await self._until_ready()
            while not self.stopping.is_set():
                await _first(self.stopping.wait(), self.reload_requested.wait())
                if self.reload_requested.is_set() and not self.stopping.is_set():
                    self.reload_requested.clear()
                    await self.reload()
            self.notifier.stopping("draining batches in flight")
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.close()
        return 0

    def stop(self) -> None:
        """SIGTERM/SIGINT: flip the state first, so the stop happens whatever the log
        line after it does."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        for consumer in self.consumers.values():
            consumer.stopping.set()
        if self.sources is not None:
            self.sources.stop()
        with contextlib.suppress(Exception):
            log.info("stopping: finishing batches in flight",
                     timeout_s=self.config.daemon.shutdown_timeout)

    # -- phases ------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        if config.daemon.metrics:  # first: a taken port fails the start before any read
            self._metrics = await MetricsServer(self).start(ingest=self._ingest())
        self._network = Network(config, self.consumer_name)
        for server in config.redis_names():  # main thread: an embedded server dies with us
            self._network.redis(server)
        self._pool = CpuPool(config.daemon.cpu_workers)
        self._liveness = Liveness(self._network.redis(""), self.consumer_name)
        for flow in config.flows:
            self._add_flow(flow, plugins.load_for_flow(flow, config.path))
        self.sources = Sources(self._network, self.consumer_name, liveness=self._liveness,
                               interval_s=config.daemon.control_interval_s)
        for job in (*config.sources, *config.moves):
            self.sources.add(job)
        # Flows read nothing until the control has read their desired state once.
        self.registry = Registry(self._network.redis(""), self.consumer_name, self._record,
                                 ttl_s=config.daemon.registry_ttl_s)
        # Before any batch: the record vouches for this daemon's writes. Bounded: a Redis
        # that does not answer is the readiness wait's to report, not the start's.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REGISTRY_FIRST_REFRESH_S):
                await self.registry.refresh()
        self.control = Control(self._network.redis, lambda: self.consumers,
                               interval_s=config.daemon.control_interval_s,
                               on_change=self.registry.refresh_soon)
        self._housekeeping = [asyncio.create_task(self.control.run(), name="control"),
                              asyncio.create_task(self.registry.run(), name="registry")]
        log.info("flowd started", consumer=self.consumer_name, config=config.path,
                 flows=[flow.name for flow in config.flows])

    def _ingest(self) -> Ingest | None:
        """The HTTP ingest API, on a connection pool of its own: a burst of posts never
        makes a commit wait. Under a supervisor, the supervisor serves it."""
        config = self.config
        if not config.http.ingest or self.metrics_socket is not None:
            return None
        return Ingest(config, connect_redis(config.redis,
                                            name=client_name(self.consumer_name, "http")))

    def _add_flow(self, flow: FlowConfig, handler: LoadedHandler) -> None:
        network = self._network
        consumer = FlowConsumer(
            flow, redis=network.redis(flow.server), writers=network.writers(),
            remotes=network.remotes(flow.server), cpu_pool=self._pool, handler=handler,
            consumer=self.consumer_name, claim_idle_ms=self.config.daemon.claim_idle_ms,
            stopping=asyncio.Event(), mux=network.mux(flow.server), state=None,
            liveness=self._liveness, vouched=self._vouched_until)
        self.consumers[flow.name] = consumer
        self._tasks[flow.name] = asyncio.create_task(consumer.run(), name=f"flow:{flow.name}")

    async def _until_ready(self) -> None:
        """Tell systemd READY=1 once Redis, ClickHouse and every group answer.

        Until then the unit stays "activating", so a dependent unit (or an operator
        watching `systemctl status`) sees that flowd is not moving data yet, and why.
        Each reason is logged once, when it first shows or changes, not at every try: a
        refused login or certificate as an error (only the operator can fix it: the
        message says how), anything else as a warning. Either way the daemon keeps waiting.
        """
        backoff = Backoff(initial=0.2, cap=5.0)
        reported: str | None = None
        while not self.stopping.is_set():
            try:
                await self._network.ping()
                for consumer in list(self.consumers.values()):
                    await consumer.ensure_group()
            except Exception as exc:
                delay = backoff.next_delay()
                reason = describe(exc)
                self.notifier.status(f"waiting for servers: {reason}"[:200])
                if reason != reported:
                    reported = reason
                    report = log.error if needs_operator(exc) else log.warning
                    report("not ready yet", error=reason, retry_in_s=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                continue
            self.notifier.ready(self._status_line())
            log.info("ready", flows=list(self.consumers))
            self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")
            return

    async def _beat(self) -> None:
        """Ping the systemd watchdog while the loop runs, and keep STATUS= current.

        The ping comes from a task on the daemon's own loop: if a handler blocks the loop,
        or the process hangs, the pings stop and systemd restarts the service.
        """
        interval = self.notifier.watchdog_interval or STATUS_INTERVAL_S
        last_status = 0.0
        while True:
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            if time.monotonic() - last_status >= STATUS_INTERVAL_S:
                self.notifier.status(self._status_line())
                last_status = time.monotonic()
            await asyncio.sleep(interval)

    def _status_line(self) -> str:
        acked = sum(c.stats.acked for c in self.consumers.values())
        dead = sum(c.stats.dead_lettered for c in self.consumers.values())
        line = f"{len(self.consumers)} flow(s); acked {acked}, dead-lettered {dead}"
        if held := self.paused_flows():
            line += f"; not running: {', '.join(held)}"
        if self._on_disk:
            line += f"; restart to run the upgraded handlers: {', '.join(self._on_disk)}"
        return line

    def _record(self) -> dict[str, Any]:
        """What the registry publishes about this daemon (flowd.admin.registry)."""
        control = self.control
        flows = {}
        for name, consumer in self.consumers.items():
            flow, stats = consumer.flow, consumer.stats
            applied = control.applied.get(name) if control is not None else None
            flows[name] = {
                "stream": flow.stream, "group": flow.group, "server": flow.server or "default",
                "state": consumer.reader.state or "starting",
                "control": applied.as_dict() if applied is not None else None,
                "read": stats.read, "acked": stats.acked,
                "dead_lettered": stats.dead_lettered, "rows": stats.rows,
                "last_commit_at": round(stats.last_commit_at, 3) or None,
                "acked_per_s": self._rates.per_second(name, stats.acked),
                "handler": self._handler_record(consumer.handling.handler)}
        # name_unique: no other process ever runs under this consumer name, so once this
        # one is known dead its entries can be taken over at once (flowd.source.liveness).
        return {"pid": os.getpid(), **process_identity(),
                "name_unique": "{pid}" in self.config.daemon.consumer,
                "process": self.process_index,
                "version": flowd.__version__, "config": str(self.config.path),
                "http": self._metrics.address if self._metrics is not None and
                self.metrics_socket is None else None,
                "control_reads": control.reads if control is not None else 0, "flows": flows,
                "sources": self.sources.record() if self.sources is not None else {}}

    def _handler_record(self, handler: LoadedHandler) -> dict[str, str]:
        record = handler.as_dict()
        if (on_disk := self._on_disk.get(handler.name)) not in (None, handler.version):
            record["installed"] = on_disk
        return record

    def _vouched_until(self) -> float:
        """Until when this daemon's registry record certainly stands (its writers' fence)."""
        return self.registry.vouched_until if self.registry is not None else 0.0

    def _source_tasks(self) -> list[asyncio.Task[None]]:
        return list(self.sources.tasks.values()) if self.sources is not None else []

    def paused_flows(self) -> list[str]:
        return [name for name, c in self.consumers.items() if c.reader.state != RUNNING]

    async def ping_clickhouse(self) -> None:
        """One SELECT 1 through the daemon's own writer (for chDB, the only way in)."""
        await self._network.writer("").ping()

    # -- hot reload --------------------------------------------------------------------
    async def reload(self) -> None:
        """SIGHUP: re-read the config file and apply its flows without losing a batch.

        Added flows start; removed flows finish their batches in hand and stop; a changed
        flow finishes its batches under the old config and restarts under the new one, so
        a routing change applies from its next batch. A config that does not load (or
        names a handler that does not import) is refused and the running one stays.
        """
        path = self.config.path
        log.info("reloading config", config=path)
        await self._check_handler_versions()
        try:
            new = await asyncio.to_thread(config_module.load, path,
                                          handlers=plugins.available())
            old_flows = {flow.name: flow for flow in self.config.flows}
            new_flows = {flow.name: flow for flow in new.flows}
            starting = {name: plugins.load_for_flow(flow, path) for name, flow in new_flows.items()
                        if old_flows.get(name) != flow}
            _check_servers_unchanged(self.config, new, starting)
            _check_source_servers_unchanged(self.config, new)
        except (ConfigError, PluginError) as exc:
            log.error("config reload refused; the running config stays", error=str(exc))
            self.notifier.status(f"reload refused: {exc}"[:200])
            return
        for section in ("redis", "clickhouse", "daemon", "redis_servers",
                        "clickhouse_servers"):
            if getattr(new, section) != getattr(self.config, section):
                log.warning("a reload does not apply server or daemon sections; restart to "
                            "apply them", section=section.replace("_servers", ".NAME"))
        # A reload often follows a table change (say, before a `flowd dlq replay`).
        self._network.forget_schemas()
        retiring = [name for name, flow in old_flows.items() if new_flows.get(name) != flow]
        await asyncio.gather(*(self._retire(name) for name in retiring))
        if self.stopping.is_set():  # SIGTERM while the old flows drained: start nothing new
            return
        for name, handler in starting.items():
            self._add_flow(new_flows[name], handler)
        if self.sources is not None:
            await self.sources.apply((*new.sources, *new.moves),
                                     self.config.daemon.shutdown_timeout)
        self.config = dataclasses.replace(self.config, flows=new.flows, sources=new.sources,
                                          moves=new.moves)
        self._network.config = self.config
        log.info("config reloaded", config=path,
                 added=sorted(set(new_flows) - set(old_flows)),
                 removed=sorted(set(old_flows) - set(new_flows)),
                 changed=sorted(set(starting) & set(old_flows)))
        self.notifier.status(self._status_line())

    async def _check_handler_versions(self) -> None:
        """A reload keeps the handler code this process imported (flowd.plugin.discovery): say which
        handlers a `pip install` upgraded on disk, so that only a restart runs them."""
        running = {c.handling.handler.name: c.handling.handler for c in self.consumers.values()}
        try:
            found = await asyncio.to_thread(plugins.upgraded, running.values())
        except Exception as exc:  # unreadable metadata must not stop the reload
            log.warning("cannot read the installed handler versions", error=describe(exc))
            return
        self._on_disk = {handler.name: on_disk for handler, on_disk in found}
        for handler, on_disk in found:
            log.warning(
                f'handler "{handler.name}": {handler.distribution} {on_disk} is installed, '
                f"but this daemon keeps running {handler.version}; a reload does not load "
                f"new handler code: restart flowd to run {on_disk} (systemctl restart flowd)",
                handler=handler.name, distribution=handler.distribution,
                running=handler.version, installed=on_disk)
        if found and self.registry is not None:
            self.registry.refresh_soon()

    async def _retire(self, name: str) -> None:
        """Stop one flow after the batches it holds are committed (up to shutdown_timeout)."""
        consumer, task = self.consumers.pop(name), self._tasks.pop(name)
        consumer.stopping.set()
        done, _ = await asyncio.wait([task], timeout=self.config.daemon.shutdown_timeout)
        if not done:
            log.warning("flow did not finish in time; its batches stay pending", flow=name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._forget_idle_consumer(consumer)
        log.info("flow stopped", flow=name, acked=consumer.stats.acked)

    async def drain(self) -> None:
        """Let every flow finish its batch in hand, up to `shutdown_timeout`."""
        tasks = [*self._tasks.values(), *self._source_tasks()]
        if not tasks:
            return
        started = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=self.config.daemon.shutdown_timeout)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("flow ended with an error", flow=task.get_name(), error=describe(exc))
        if pending:
            log.warning("shutdown timeout: abandoning batches in flight (they stay pending)",
                        flows=[task.get_name() for task in pending])
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        log.info("drained", seconds=round(time.monotonic() - started, 2))

    async def close(self) -> None:
        if self._metrics is not None:
            await self._metrics.close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in self._housekeeping:
            task.cancel()
        await asyncio.gather(*self._housekeeping, return_exceptions=True)
        if self.registry is not None:
            await self.registry.withdraw()
        tasks = [*self._tasks.values(), *self._source_tasks()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._network is not None:
            for consumer in self.consumers.values():
                await self._forget_idle_consumer(consumer)
            await self._network.close()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.close)
        log.info("flowd stopped",
                 totals={name: c.stats.acked for name, c in self.consumers.items()})

    async def _forget_idle_consumer(self, consumer: FlowConsumer) -> None:
        """Remove our consumer name from the flow's group when it holds nothing pending.

        Consumer names carry the pid, so without this every restart would leave one more
        name in XINFO CONSUMERS.
        """
        with contextlib.suppress(Exception):
            await consumer.reader.group.forget_self()


def _check_servers_unchanged(running: Config, new: Config, starting: Iterable[str]) -> None:
    """A reload applies flows, not server sections: a starting flow must find every server
    it names as the running daemon knows it."""
    for name in starting:
        flow = new.flow(name)
        for i, out in enumerate(flow.to):
            section = "redis" if isinstance(out, StreamOutput) else "clickhouse"
            _same_server(running, new, section, out.server, name, f"to[{i}].server")
        _same_server(running, new, "redis", flow.server, name, "server")


def _check_source_servers_unchanged(running: Config, new: Config) -> None:
    for source in new.sources:
        if source not in running.sources:
            _same_server(running, new, "clickhouse", source.server, source.name, "server",
                         kind="source")
            _same_server(running, new, "redis", source.redis_server, source.name,
                         "to[0].server", kind="source")


def _same_server(running: Config, new: Config, section: str, server: str, flow: str,
                 key: str, kind: str = "flow") -> None:
    pick = (lambda c: c.redis_for(server)) if section == "redis" else (
        lambda c: c.clickhouse_for(server))
    try:
        if pick(running) == pick(new):
            return
    except KeyError:
        pass
    raise ConfigError(new.path, f"[{section}.{server}] is new or changed: a reload does not "
                      "apply server sections, restart flowd to apply it", flow=flow, key=key,
                      kind=kind)


class _Rates:
    """Entries acked per second of each flow, over at least `WINDOW_S` between looks."""

    WINDOW_S = 1.0

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int, float]] = {}  # (when, acked, rate)

    def per_second(self, flow: str, acked: int) -> float:
        now = time.monotonic()
        last = self._last.get(flow)
        if last is None or acked < last[1]:  # first look, or replaced by a reload
            self._last[flow] = (now, acked, 0.0)
            return 0.0
        then, before, rate = last
        if now - then >= self.WINDOW_S:
            rate = round((acked - before) / (now - then), 1)
            self._last[flow] = (now, acked, rate)
        return rate


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of `waits` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
