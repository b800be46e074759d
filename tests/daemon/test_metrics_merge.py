"""With `[daemon] processes = N`, one endpoint: the supervisor merges its processes' figures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import redis
import servers
from clickhouse_driver import Client
from prometheus_client.parser import text_string_to_metric_families
from shared import Scrape, get
from support import Flowd, all_acked, hub_entry, produce, wait_for
from test_supervisor import FLOW, STREAM, alive, children, consumer_pids

LABELS = {"flow": "ingest", "stream": STREAM, "server": "default"}


def value(scrape: Scrape, name: str, **labels: str) -> float | None:
    return scrape.samples.get((name, tuple(sorted(labels.items()))))


def own_scrape(pid: int) -> dict[str, float]:
    """One process's own figures, from the Unix socket its supervisor gave it."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    path = next(item.split(b"=", 1)[1] for item in environ
                if item.startswith(b"FLOWD_METRICS_SOCKET="))
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        reply = b"".join(iter(lambda: conn.recv(65536), b""))
    body = reply.partition(b"\r\n\r\n")[2].decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(body)
            for sample in family.samples if sample.labels == LABELS}


def start_two(write_config: Callable[..., Path], start_flowd: Callable[..., Flowd],
              ) -> tuple[Flowd, int]:
    port = servers.free_port()
    flowd = start_flowd(write_config(FLOW, processes=2, metrics=f"127.0.0.1:{port}"))
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="/healthz 200 after the start")
    return flowd, port


def test_one_scrape_sums_the_counters_of_every_process_and_shows_the_group_once(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd, port = start_two(write_config, start_flowd)
    produce(r, STREAM, [hub_entry(i) for i in range(20_000)])
    wait_for(lambda: all_acked(r, STREAM, "flowd", 20_000), what="20,000 entries acked")
    wait_for(lambda: len(consumer_pids(r)) == 2, what="both processes as consumers")
    wait_for(lambda: value(Scrape(port), "flowd_entries_acked_total", **LABELS) == 20_000,
             what="the acked counter summed over both processes")

    scrape = Scrape(port)
    # Both processes took entries, and the one endpoint shows their sum.
    own = [own_scrape(pid)["flowd_entries_acked_total"] for pid in children(flowd.pid)]
    assert len(own) == 2 and all(count > 0 for count in own) and sum(own) == 20_000
    assert value(scrape, "flowd_rows_inserted_total", **LABELS) == 20_000
    assert value(scrape, "flowd_entries_read_total", **LABELS) == 20_000
    assert value(scrape, "flowd_batch_duration_seconds_count", **LABELS) == \
        value(scrape, "flowd_batches_total", **LABELS)
    # Group gauges come from Redis: one series per flow, not one per process.
    assert value(scrape, "flowd_pending", **LABELS) == 0
    assert value(scrape, "flowd_lag", **LABELS) == 0
    assert [key for key in scrape.samples if key[0] == "flowd_pending"] == \
        [("flowd_pending", tuple(sorted(LABELS.items())))]
    assert value(scrape, "flowd_processes") == 2
    assert value(scrape, "flowd_processes_unanswered") == 0
    # Per-process gauges keep their process apart.
    memory = {dict(labels)["process"] for name, labels in scrape.samples
              if name == "process_resident_memory_bytes"}
    assert memory == {"0", "1"}
    # Only the configured port is served: the processes' own endpoints are Unix sockets
    # (before, process 1 served its own figures on the port after it).
    assert "flowd_entries_read" not in get(port + 1, "/metrics")[1]
    assert flowd.terminate() == 0


def test_healthz_names_each_process_is_503_while_one_is_gone_and_200_after_its_restart(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd, port = start_two(write_config, start_flowd)
    status, body = get(port, "/healthz")
    assert status == 200
    assert body.splitlines() == ["ok", "process 0: ok", "process 1: ok"]

    first, second = children(flowd.pid)
    os.kill(first, signal.SIGSTOP)  # frozen: it does not answer, and is not yet restarted
    try:
        status, body = get(port, "/healthz")
        assert status == 503
        assert "process 1: ok" in body.splitlines()
        # Frozen, it does not answer; on a host slow enough for the supervisor's 10 s to pass
        # first, it is being restarted and does not serve yet. Either way: not ok, and named.
        assert any(line.startswith(("process 0: no answer", "process 0: not serving"))
                   for line in body.splitlines()), body
        scrape = Scrape(port)
        assert value(scrape, "flowd_processes_unanswered") == 1
        assert value(scrape, "flowd_entries_read_total", **LABELS) is not None  # the other one's
    finally:
        # The supervisor kills a process silent for 10 s; it may have done so by now.
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGCONT)
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="/healthz 200 once it answers")
    assert alive(second)

    # A process that dies is restarted, and its successor serves on the same socket.
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: second not in children(flowd.pid) and len(children(flowd.pid)) == 2,
             what="the killed process replaced")
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="/healthz 200 after the restart")
    assert value(Scrape(port), "flowd_processes_unanswered") == 0
    assert flowd.terminate() == 0
