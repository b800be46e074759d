"""Prometheus `/metrics` and `/healthz`, served on the daemon's own event loop.

Served by flowd.http.server (aiohttp) on the daemon's own loop, not in a thread: a scrape
that gets an answer is itself proof that the loop moving the data is not stuck.
Every figure is read at scrape time: counters from each flow's `FlowStats`, lag and
pending from Redis (`flowd.admin.status.flow_status`), so nothing is kept twice; the
`[[source]]` and `[[move]]` series from their states in Redis (flowd.http.metrics_sources).

Every per-flow series has the labels `flow`, `stream` and `server`: the Redis the flow
reads, by its [redis.NAME] name, "default" for [redis] (`flowd.admin.status.server_label`). Lag
and pending are read on that server; each server is asked on a thread of its own, so one
that hangs leaves the others' figures (and the loop) alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import socket
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, Self

import redis
import structlog
from clickhouse_driver import Client
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

import flowd
from flowd.admin import registry
from flowd.admin.figures import server_label
from flowd.admin.scheduled_status import read_moves, read_sources
from flowd.admin.status import FlowStatus, flow_status
from flowd.core.config import LISTEN_ENV, Config, FlowConfig
from flowd.core.connections import clickhouse_client, connect_redis_sync, safe_url
from flowd.core.errors import ConfigurationError
from flowd.core.retry import describe
from flowd.core.states import STATES
from flowd.http.ingest import Ingest
from flowd.http.metrics_sources import move_families, source_families
from flowd.http.server import HttpServer, ServeError
from flowd.pipeline.consumer import FlowConsumer
from flowd.pipeline.stats import BATCH_SECONDS_BUCKETS, FlowStats
from flowd.sync.state import MoveState, SourceState

__all__ = ["CHECK_TIMEOUT", "Endpoint", "FlowCollector", "MetricsError", "MetricsServer"]

log = structlog.get_logger(__name__)

CHECK_TIMEOUT = 2.0  # seconds a health check or a scrape's Redis query may take
_LABELS = ("flow", "stream", "server")

# FlowStats field → (metric name, help). Counters only go up while the daemon runs; a flow
# replaced by a reload starts again from 0, which Prometheus treats as a counter reset.
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("read", "flowd_entries_read",
     "Entries taken into a batch (an entry delivered again counts again)."),
    ("acked", "flowd_entries_acked",
     "Entries acknowledged after every output confirmed (dead-lettered ones included)."),
    ("held", "flowd_entries_retried",
     "Entries the handler failed on, held back and retried after a back-off."),
    ("failed_batches", "flowd_batch_failures",
     "Batch attempts that failed (an outage, or data a write refused) and were retried or "
     "split."),
    ("dead_lettered", "flowd_entries_dead_lettered",
     "Entries written to the flow's dead-letter stream."),
    ("rows", "flowd_rows_inserted", "Rows inserted into ClickHouse tables."),
    ("deduplicated", "flowd_rows_deduplicated",
     "Rows of replayed entries found already written, and not inserted again."),
    ("streamed", "flowd_records_streamed", "Records written to stream outputs."),
    ("unrouted", "flowd_records_unrouted", "Records that matched no output (acked, not written)."),
    ("vanished", "flowd_entries_vanished", "Entries deleted from the stream while pending."),
    ("batches", "flowd_batches", "Batches committed."),
)


class MetricsError(ConfigurationError):
    """The metrics endpoint cannot be served (the address is taken, or not this host's)."""


class Daemon(Protocol):
    """What the endpoint reads from the worker; read again at every request, so flows added
    or replaced by a reload show up."""

    config: Config
    consumer_name: str
    consumers: dict[str, FlowConsumer]
    stopping: asyncio.Event
    # Under a supervisor ([daemon] processes = N): serve on this Unix socket, for the
    # supervisor to merge into the one endpoint it serves on the configured address.
    metrics_socket: str | None

    async def ping_clickhouse(self) -> None: ...


class FlowCollector:
    """A prometheus-client collector over the daemon's flows, read at scrape time.

    `statuses` (the Redis side: lag, pending, lengths) is refreshed by the server just
    before each scrape, because `collect()` is synchronous and must not wait on Redis.
    """

    def __init__(self, consumers: Callable[[], Mapping[str, FlowConsumer]],
                 daemon_id: str = "") -> None:
        self._consumers = consumers
        self._daemon_id = daemon_id
        self.statuses: dict[str, FlowStatus] = {}
        # Also refreshed before each scrape: the /healthz verdict and the registry's count
        # of daemons by state (None: the registry could not be read).
        self.checks: dict[str, str] = {}
        self.daemons: dict[str, int] | None = None
        # And the [[source]]s' and [[move]]s' states with the Redis time each was read at
        # (metrics_sources).
        self.sources: list[tuple[SourceState, int]] = []
        self.moves: list[tuple[MoveState, int]] = []

    def collect(self) -> Iterator[Metric]:
        flows = [([c.flow.name, c.flow.stream, server_label(c.flow.server)], c.stats)
                 for c in self._consumers().values()]
        for field, name, help_text in _COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=_LABELS)
            for labels, stats in flows:
                family.add_metric(labels, getattr(stats, field))
            yield family
        histogram = HistogramMetricFamily(
            "flowd_batch_duration_seconds",
            "Time from a batch's handling to its commit (read wait not included).",
            labels=_LABELS)
        for labels, stats in flows:
            histogram.add_metric(labels, _buckets(stats), sum_value=stats.batch_seconds_sum)
        yield histogram
        yield from self._group_gauges()
        state = GaugeMetricFamily(
            "flowd_flow_state", "1 for the desired state this daemon applies to the flow "
            "(running, paused, draining; none while starting), 0 for the others.",
            labels=[*_LABELS, "state"])
        for consumer in self._consumers().values():
            labels = [consumer.flow.name, consumer.flow.stream, server_label(consumer.flow.server)]
            for name in STATES:
                state.add_metric([*labels, name], 1 if consumer.reader.state == name else 0)
        yield state
        yield from source_families(self.sources)
        yield from move_families(self.moves)
        yield from self._daemon_gauges()

    def _daemon_gauges(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("flowd_daemon_info", "This daemon: its registry id, host "
                                 "and version (always 1).", labels=["daemon", "host", "version"])
        info.add_metric([self._daemon_id, socket.gethostname(), flowd.__version__], 1)
        yield info
        if self.checks:
            healthy = GaugeMetricFamily("flowd_healthy", "1 when /healthz would answer 200.")
            healthy.add_metric([], int(all(word == "ok" for word in self.checks.values())))
            check = GaugeMetricFamily("flowd_health_check", "1 when the check passes (loop, "
                                      "redis [NAME], clickhouse [NAME]).", labels=["check"])
            for name, word in self.checks.items():
                check.add_metric([name], int(word == "ok"))
            yield from (healthy, check)
        if self.daemons is not None:
            daemons = GaugeMetricFamily(
                "flowd_registry_daemons", "Daemons in the registry by state (live; stopped "
                "cleanly; gone: expired without a clean stop), as this daemon reads it.",
                labels=["state"])
            for name in ("live", "stopped", "gone"):
                daemons.add_metric([name], self.daemons.get(name, 0))
            yield daemons

    def _group_gauges(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "flowd_lag", "Entries in the stream not yet delivered to the flow's group "
            "(absent when Redis cannot tell).", labels=_LABELS)
        pending = GaugeMetricFamily(
            "flowd_pending", "Entries delivered to the group and not yet acknowledged.",
            labels=_LABELS)
        idle = GaugeMetricFamily(
            "flowd_oldest_pending_idle_seconds",
            "Idle time of the longest-idle pending entry (0 when none is pending).",
            labels=_LABELS)
        length = GaugeMetricFamily("flowd_stream_length", "XLEN of the flow's stream.",
                                   labels=_LABELS)
        dead = GaugeMetricFamily("flowd_dead_letter_length",
                                 "XLEN of the flow's dead-letter stream.",
                                 labels=[*_LABELS, "dead_letter"])
        for status in self.statuses.values():
            labels = [status.flow, status.stream, server_label(status.server)]
            length.add_metric(labels, status.length)
            if status.dead_letter is not None and status.dead_letter_length is not None:
                dead.add_metric([*labels, status.dead_letter], status.dead_letter_length)
            if not status.group_exists:
                continue
            if status.lag is not None:
                lag.add_metric(labels, status.lag)
            pending.add_metric(labels, status.pending)
            idle.add_metric(labels, status.oldest_pending_idle_ms / 1000)
        yield from (lag, pending, idle, length, dead)


def _buckets(stats: FlowStats) -> list[tuple[str, float]]:
    """FlowStats keeps per-bucket counts; Prometheus wants them cumulative, +Inf last."""
    bounds = [*(floatToGoString(b) for b in BATCH_SECONDS_BUCKETS), "+Inf"]
    total, buckets = 0, []
    for bound, count in zip(bounds, stats.batch_seconds, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


class Endpoint:
    """The HTTP side: `/metrics` and `/healthz` on the configured address (or a Unix
    socket), answered by `metrics()` and `health()`."""

    def __init__(self, config: Config, unix_path: str | None = None) -> None:
        self.config = config
        address = config.daemon.metrics_address()
        if address is None:
            raise ValueError("metrics are turned off in the config")
        self.host, self.port = address
        self.unix_path = unix_path
        self._server: HttpServer | None = None
        self.registry: CollectorRegistry | None = None  # where the HTTP answers are counted

    @property
    def address(self) -> str:
        return self.unix_path or f"{self.host or ''}:{self.port}"

    async def start(self, ingest: Ingest | None = None) -> Self:
        """Serve; with `ingest`, POST /v1/streams/{stream} too."""
        self._server = HttpServer(metrics=self.metrics, health=self.health, ingest=ingest,
                                  registry=self.registry)
        what, key = ("HTTP", "http.listen") if self.config.http.ingest else \
            ("metrics", "daemon.metrics")
        try:
            await self._server.start(
                self.host, self.port, unix_path=self.unix_path,
                what=f"{what} on {self.address} (key {key} in {self.config.path})")
        except ServeError as exc:
            message = str(exc)
            if "in use" in message and self.unix_path is None:
                message += (f"; on one host, each daemon needs its own address: set "
                            f"{LISTEN_ENV} per daemon, or run them as one service with "
                            "[daemon] processes = N")
            raise MetricsError(message) from None
        if self.unix_path is None and self._server.port is not None:
            self.port = self._server.port
        log.info("http served", address=self.address,
                 paths=["/metrics", "/healthz", "/openapi.json",
                        *(["/v1/streams/{stream}"] if ingest else [])])
        return self

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def metrics(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type, for the scraper's Accept header."""
        raise NotImplementedError

    async def health(self) -> tuple[bool, dict[str, str]]:
        """(healthy, a word per check)."""
        raise NotImplementedError


class MetricsServer(Endpoint):
    """`/metrics` and `/healthz` for one daemon; one registry per server, no globals."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon.config, daemon.metrics_socket)
        self.daemon = daemon
        self.registry = CollectorRegistry()
        self.collector = FlowCollector(lambda: self.daemon.consumers, daemon.consumer_name)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        # Blocking clients, one per server, each made and used on that server's own
        # thread: a stuck server stalls its thread, never the loop or another server's
        # checks. Their timeouts are short, so a stalled thread frees up soon.
        self._redis: dict[str, redis.Redis] = {}
        self._clickhouse: dict[str, Client] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._running: dict[str, asyncio.Future[Any]] = {}
        self._closed = False

    async def close(self) -> None:
        await super().close()
        self._shutdown_threads()

    def _shutdown_threads(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Clients are closed on their own threads, after whatever query they are running.
        # (Copies: a server's thread may be making its client right now.)
        for server, client in list(self._clickhouse.items()):
            self._threads[f"clickhouse:{server}"].submit(client.disconnect)
        for server, client in list(self._redis.items()):
            self._threads[f"redis:{server}"].submit(client.close)
        for executor in list(self._threads.values()):
            executor.shutdown(wait=False)

    def _thread(self, key: str) -> ThreadPoolExecutor:
        if key not in self._threads:
            self._threads[key] = ThreadPoolExecutor(
                1, thread_name_prefix=f"flowd-metrics-{key.replace(':', '-')}")
        return self._threads[key]

    def _sync_redis(self, server: str) -> redis.Redis:
        """The client of the Redis named `server`; on its own thread only (a cluster
        client maps the slots as it is made, which blocks)."""
        client = self._redis.get(server)
        if client is None:
            client = self._redis[server] = connect_redis_sync(
                self.config.redis_for(server), socket_timeout=CHECK_TIMEOUT,
                connect_timeout=CHECK_TIMEOUT)
        return client

    def _redis_servers(self) -> list[str]:
        """The Redis servers the daemon waits for at its start (flowd.daemon.network.Network.ping):
        every one a flow reads, and [redis]."""
        return sorted({flow.server for flow in self.daemon.config.flows} | {""})

    # -- what is served ----------------------------------------------------------------
    async def metrics(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type, for the scraper's Accept header."""
        (self.collector.statuses, (_, self.collector.checks), self.collector.daemons,
         (self.collector.sources, self.collector.moves)) = await asyncio.gather(
            self._statuses(), self.health(), self._daemons(), self._scheduled())
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def _statuses(self) -> dict[str, FlowStatus]:
        """Lag, pending and lengths of every flow, each read on the Redis it reads; a
        server that does not answer only loses its own flows' gauges."""
        by_server: dict[str, list[FlowConfig]] = {}
        for consumer in self.daemon.consumers.values():
            by_server.setdefault(consumer.flow.server, []).append(consumer.flow)
        results = await asyncio.gather(*(
            self._in_thread(f"statuses:{server}", self._thread(f"redis:{server}"),
                            functools.partial(self._read_statuses, server, flows))
            for server, flows in by_server.items()), return_exceptions=True)
        statuses: dict[str, FlowStatus] = {}
        for server, result in zip(by_server, results, strict=True):
            if isinstance(result, BaseException):  # the counters are still worth serving
                log.warning("cannot read lag and pending from Redis for /metrics",
                            server=server_label(server),
                            redis=safe_url(self.config.redis_for(server).url),
                            error=_describe(result))
                continue
            statuses.update(result)
        return statuses

    async def _scheduled(self) -> tuple[list[tuple[SourceState, int]],
                                        list[tuple[MoveState, int]]]:
        """Each [[source]]'s state, read on the Redis of its streams, and each [[move]]'s, on
        [redis]; a server that does not answer only loses its own series."""
        config = self.daemon.config
        servers = sorted({source.redis_server for source in config.sources} |
                         ({""} if config.moves else set()))
        results = await asyncio.gather(*(
            self._in_thread(f"scheduled:{server}", self._thread(f"redis:{server}"),
                            functools.partial(self._read_scheduled, server))
            for server in servers), return_exceptions=True)
        sources: list[tuple[SourceState, int]] = []
        moves: list[tuple[MoveState, int]] = []
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("cannot read the sources' and moves' states from Redis for "
                            "/metrics", server=server_label(server), error=_describe(result))
                continue
            now_ms, found, moved = result
            sources += [(state, now_ms) for state in found]
            moves += [(state, now_ms) for state in moved]
        return sources, moves

    def _read_scheduled(self, server: str) -> tuple[int, list[SourceState], list[MoveState]]:
        config, client = self.daemon.config, self._sync_redis(server)
        now_ms, found = read_sources(
            client, [source for source in config.sources if source.redis_server == server])
        moved = read_moves(client, config.moves)[1] if server == "" else []
        return now_ms, found, moved

    async def _daemons(self) -> dict[str, int] | None:
        try:
            records = await self._in_thread("registry", self._thread("redis:"),
                                            lambda: registry.list_daemons(self._sync_redis("")))
        except Exception as exc:
            log.warning("cannot read the registry for /metrics", error=_describe(exc))
            return None
        counts: dict[str, int] = {}
        for record in records:
            counts[record["state"]] = counts.get(record["state"], 0) + 1
        return counts

    def _read_statuses(self, server: str, flows: list[FlowConfig]) -> dict[str, FlowStatus]:
        client = self._sync_redis(server)
        return {flow.name: flow_status(client, flow) for flow in flows}

    async def health(self) -> tuple[bool, dict[str, str]]:
        """(healthy, a word per check): every Redis a flow reads answers PING, every
        ClickHouse a table output names answers SELECT 1, and the loop runs (this coroutine
        running is the proof) and is not stopping. Checks are named "redis", "redis NAME",
        "clickhouse", "clickhouse NAME"."""
        checks: dict[str, str] = {"loop": "ok"}
        if self.daemon.stopping.is_set():
            checks["loop"] = "stopping"
        waits: dict[str, Any] = {}
        for server in self._redis_servers():
            waits[_check_name("redis", server)] = self._in_thread(
                f"redis:{server}", self._thread(f"redis:{server}"),
                functools.partial(self._ping_redis, server))
        for server in self.daemon.config.clickhouse_names():
            if self.config.clickhouse_for(server).engine != "chdb":
                waits[_check_name("clickhouse", server)] = self._in_thread(
                    f"clickhouse:{server}", self._thread(f"clickhouse:{server}"),
                    functools.partial(self._select_one, server))
            elif not server:  # in this process: ask the daemon's own
                waits["clickhouse"] = asyncio.wait_for(self.daemon.ping_clickhouse(),
                                                       CHECK_TIMEOUT)
            # A named chDB is not checked: the daemon pings its unnamed writer only.
        results = await asyncio.gather(*waits.values(), return_exceptions=True)
        for name, result in zip(waits, results, strict=True):
            checks[name] = "ok" if not isinstance(result, BaseException) else _describe(result)
        return all(v == "ok" for v in checks.values()), checks

    def _ping_redis(self, server: str) -> None:
        self._sync_redis(server).ping()

    def _select_one(self, server: str) -> None:
        client = self._clickhouse.get(server)
        if client is None:
            client = self._clickhouse[server] = clickhouse_client(dataclasses.replace(
                self.config.clickhouse_for(server), connect_timeout=CHECK_TIMEOUT,
                send_receive_timeout=CHECK_TIMEOUT))
        try:
            client.execute("SELECT 1")
        except BaseException:
            client.disconnect()  # the next check starts on a fresh connection
            raise

    async def _in_thread(self, name: str, executor: ThreadPoolExecutor,
                         fn: Callable[[], Any]) -> Any:
        """Run `fn` on `executor`, waiting at most CHECK_TIMEOUT (plus a little). A call
        still running from an earlier request is awaited, not queued behind: a server that
        hangs costs one stuck call, not one per scrape."""
        running = self._running.get(name)
        if running is None or running.done():
            running = asyncio.get_running_loop().run_in_executor(executor, fn)
            running.add_done_callback(_retrieve)
            self._running[name] = running
        return await asyncio.wait_for(asyncio.shield(running), timeout=CHECK_TIMEOUT + 0.5)


def _check_name(kind: str, server: str) -> str:
    """A /healthz line's name: "redis" for [redis], "redis edge" for [redis.edge]."""
    return f"{kind} {server}" if server else kind


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


def _describe(exc: BaseException) -> str:
    if type(exc) is TimeoutError:  # asyncio's, from wait_for; the drivers' own have a text
        return f"no answer within {CHECK_TIMEOUT:g}s"
    return describe(exc)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Consume the outcome of a call nobody waited for any more (it outlived its timeout),
    so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
