"""One `/metrics` and `/healthz` for a supervisor's processes ([daemon] processes = N).

Each process serves its own figures on a Unix socket in the supervisor's directory; the
supervisor serves the configured address and answers a scrape by asking every process
and merging what they say, so Prometheus scrapes one target whatever N is:

- counters and histograms (entries read, acked, dead-lettered; batch durations) are
  summed over the processes;
- `flowd_*` gauges (lag, pending, stream lengths) are read from Redis by each process and
  describe the group, not the process: the highest reading is served (so are the
  `flowd_source_*` and `flowd_move_*` counters, read from Redis too); but health gauges
  (`flowd_healthy`, `flowd_health_check`) serve the lowest: one unhealthy process is enough;
- other gauges (memory, open files, start time) get a `process` label.

A process that does not answer is left out of the sum and counted in
`flowd_processes_unanswered`; `/healthz` is 200 only when every process says it is healthy.
A restarted process starts its counters from 0, so the sums drop then, which Prometheus's
`rate()` treats as a counter reset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import aiohttp
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from flowd.core.config import Config
from flowd.core.retry import describe
from flowd.http.metrics import CHECK_TIMEOUT, Endpoint

__all__ = ["MergedMetrics"]

log = structlog.get_logger(__name__)

_SUMMED = frozenset({"counter", "histogram", "summary"})
_LOWEST = frozenset({"flowd_healthy", "flowd_health_check"})
# Counters every process reads from Redis (the sources' and moves' states): the same count,
# not parts.
_FROM_REDIS = ("flowd_source_", "flowd_move_")
Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


class MergedMetrics(Endpoint):
    def __init__(self, config: Config, sockets: Callable[[], Sequence[str]]) -> None:
        super().__init__(config)
        self.sockets = sockets  # each process's socket, in process order
        self.registry = CollectorRegistry()
        self._merged: list[Metric] = []
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        return iter(self._merged)

    async def metrics(self, accept: str = "") -> tuple[bytes, str]:
        sockets = self.sockets()
        replies = await asyncio.gather(*(_get(path, "/metrics") for path in sockets),
                                       return_exceptions=True)
        families: dict[str, Metric] = {}
        values: dict[str, dict[Key, float]] = {}
        unanswered = 0
        for index, reply in enumerate(replies):
            if isinstance(reply, BaseException) or reply[0] != 200:
                unanswered += 1
                log.warning("a process did not answer for /metrics", index=index,
                            error=_reason(reply))
                continue
            for family in text_string_to_metric_families(reply[1]):
                _add(families, values, family, index)
        merged = []
        for name, family in families.items():
            for (sample, labels), value in values[name].items():
                family.add_sample(sample, dict(labels), value)
            merged.append(family)
        processes = GaugeMetricFamily("flowd_processes", "Daemon processes configured.")
        processes.add_metric([], len(sockets))
        missing = GaugeMetricFamily(
            "flowd_processes_unanswered",
            "Processes that did not answer this scrape (left out of the sums).")
        missing.add_metric([], unanswered)
        self._merged = [*merged, processes, missing]
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def health(self) -> tuple[bool, dict[str, str]]:
        replies = await asyncio.gather(*(_get(path, "/healthz") for path in self.sockets()),
                                       return_exceptions=True)
        checks: dict[str, str] = {}
        for index, reply in enumerate(replies):
            if isinstance(reply, BaseException):
                checks[f"process {index}"] = _reason(reply)
                continue
            status, body = reply
            # The process's own answer, its first line ("ok"/"unhealthy") dropped.
            details = ", ".join(body.strip().splitlines()[1:])
            checks[f"process {index}"] = "ok" if status == 200 else f"unhealthy ({details})"
        return all(word == "ok" for word in checks.values()), checks


def _add(families: dict[str, Metric], values: dict[str, dict[Key, float]], family: Any,
         index: int) -> None:
    name = family.name
    if name not in families:
        families[name] = Metric(name, family.documentation, family.type, family.unit)
        values[name] = {}
    into = values[name]
    per_process = family.type not in _SUMMED and not name.startswith("flowd_")
    summed = family.type in _SUMMED and not name.startswith(_FROM_REDIS)
    for sample in family.samples:
        labels = {**sample.labels, "process": str(index)} if per_process else sample.labels
        key = (sample.name, tuple(sorted(labels.items())))
        if summed:
            into[key] = into.get(key, 0.0) + sample.value
        elif name in _LOWEST:
            into[key] = min(into.get(key, sample.value), sample.value)
        else:
            into[key] = max(into.get(key, sample.value), sample.value)


async def _get(path: str, target: str) -> tuple[int, str]:
    """GET `target` from the endpoint on Unix socket `path`: (status, body)."""
    # A process's own checks take up to CHECK_TIMEOUT; allow it that and a little more.
    timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT + 1.0)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path),
                                     timeout=timeout) as session, \
            session.get(f"http://flowd{target}") as response:
        return response.status, await response.text()


def _reason(reply: object) -> str:
    if isinstance(reply, TimeoutError):
        return f"no answer within {CHECK_TIMEOUT + 1.0:g}s"
    if isinstance(reply, (FileNotFoundError, ConnectionRefusedError)):
        return "not serving (starting, restarting or gone)"
    if isinstance(reply, BaseException):
        return describe(reply)
    return f"status {reply[0]}" if isinstance(reply, tuple) else str(reply)
