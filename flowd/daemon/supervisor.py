"""`[daemon] processes = N`: one service, N daemon processes, each its own consumer.

One interpreter moves about 150-170k entries a second before its GIL is the limit
(bench/README.md); a second process on the same groups passes that. The supervisor does no
data work. It starts N `flowd run` children, restarts one that dies, forwards SIGTERM,
SIGINT and SIGHUP, and speaks for them to systemd.

The children talk to the supervisor with the protocol they would use with systemd: it sets
NOTIFY_SOCKET to a datagram socket of its own, and the kernel tells it which child sent each
line (SO_PASSCRED). So READY=1 goes to systemd once every child is ready, WATCHDOG=1 only
while every child's own loop keeps pinging, and a child that stops pinging is killed and
restarted. Metrics are served by the supervisor on the configured address: it merges what
each child serves on a Unix socket of its own (flowd.http.metrics_merge).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from flowd.core import embedded, lifeline
from flowd.core.config import Config
from flowd.core.connections import connect_redis
from flowd.daemon.systemd import Notifier
from flowd.http.ingest import Ingest
from flowd.http.metrics_merge import MergedMetrics

__all__ = ["Supervisor", "child_index", "child_metrics_socket", "follow_supervisor"]

log = structlog.get_logger(__name__)

CHILD_WATCHDOG_USEC = 1_000_000  # children ping every 0.5 s
HUNG_AFTER_S = 10.0  # a ready child silent this long is killed and restarted
BEAT_S = 0.25
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(slots=True)
class Child:
    index: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    last_ping: float = field(default_factory=time.monotonic)
    restarts: int = 0


class Supervisor:
    def __init__(self, config: Config, argv: list[str]) -> None:
        self.config = config
        self.argv = argv  # the child's command line: this `flowd run`, as it was given
        self.children = [Child(i) for i in range(config.daemon.processes)]
        self.stopping = asyncio.Event()
        self.notifier = Notifier()
        self._ready_sent = False
        self._socket: socket.socket | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self._embedded: list[embedded.EmbeddedRedis] = []
        self._watchers: set[asyncio.Task[None]] = set()
        self._metrics: MergedMetrics | None = None

    def run(self) -> int:
        import uvloop

        return uvloop.run(self.main())

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            # Started here, so every child finds it running and none of them owns it.
            self._embedded = [server for name in self.config.redis_names()
                              if (server := embedded.ensure(self.config.redis_for(name)))]
            self._listen(loop)
            if self.config.daemon.metrics:  # first: a taken port fails the start
                # The HTTP ingest is the supervisor's: it needs only Redis, not a child.
                ingest = Ingest(self.config, connect_redis(
                    self.config.redis, name="flowd:supervisor:http")) \
                    if self.config.http.ingest else None
                self._metrics = await MergedMetrics(self.config, self._metrics_sockets).start(
                    ingest=ingest)
            for child in self.children:
                await self._spawn(child)
            log.info("flowd supervisor started", processes=len(self.children),
                     config=self.config.path)
            while not self.stopping.is_set():
                self._check_health()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=BEAT_S)
            self.notifier.stopping("draining batches in flight")
            return await self._stop_children()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.close()

    def stop(self) -> None:
        """SIGTERM/SIGINT: flip the state first, so the stop happens whatever the log
        line after it does."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        with contextlib.suppress(Exception):
            log.info("stopping: every process finishes its batches in flight")

    async def close(self) -> None:
        if self._metrics is not None:
            await self._metrics.close()
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
        for task in self._watchers:
            task.cancel()
        if self._socket is not None:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
        if self._directory is not None:
            self._directory.cleanup()
        for server in self._embedded:
            await asyncio.to_thread(server.stop)
        self.notifier.close()

    # -- children ----------------------------------------------------------------------
    async def _spawn(self, child: Child) -> None:
        env = {**os.environ, "FLOWD_PROCESS_INDEX": str(child.index),
               "FLOWD_SUPERVISOR_PID": str(os.getpid()),
               "NOTIFY_SOCKET": self._socket.getsockname(),
               "WATCHDOG_USEC": str(CHILD_WATCHDOG_USEC)}
        env.pop("WATCHDOG_PID", None)  # systemd's, meant for the supervisor
        if self.config.daemon.metrics:
            env["FLOWD_METRICS_SOCKET"] = self._metrics_sockets()[child.index]
        child.process = await asyncio.create_subprocess_exec(*self.argv, env=env)
        child.ready, child.last_ping = False, time.monotonic()
        log.info("process started", index=child.index, pid=child.process.pid)
        task = asyncio.create_task(self._watch(child, child.process))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, child: Child, process: asyncio.subprocess.Process) -> None:
        """Restart a child that exits while the supervisor is not stopping."""
        code = await process.wait()
        if self.stopping.is_set() or child.process is not process:
            return
        child.restarts += 1
        wait = min(30.0, 2.0 ** (child.restarts - 1))  # a child that keeps dying waits more
        log.error("process exited; restarting it", index=child.index, pid=process.pid,
                  exit_code=code, restart_in_s=wait)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=wait)
        if not self.stopping.is_set():
            await self._spawn(child)

    def _forward(self, sig: int) -> None:
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(sig)
        log.info("signal forwarded", signal=signal.Signals(sig).name)

    async def _stop_children(self) -> int:
        """SIGTERM every child; 0 if all of them drained and exited 0."""
        self._forward(signal.SIGTERM)
        running = [c.process for c in self.children
                   if c.process is not None and c.process.returncode is None]
        late: set[asyncio.Future[int]] = set()
        if running:
            _, late = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running],
                                         timeout=self.config.daemon.shutdown_timeout + 10)
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                log.error("process did not stop in time; killing it", index=child.index)
                child.process.kill()
        codes = [c.process.returncode for c in self.children if c.process is not None]
        log.info("flowd supervisor stopped", exit_codes=codes)
        # -SIGTERM: it was still starting (no handler yet), so it held nothing.
        clean = all(code in (0, -signal.SIGTERM) for code in codes)
        return 0 if not late and clean else 1

    def _metrics_sockets(self) -> list[str]:
        """Where each child serves its metrics: sockets only the supervisor can reach."""
        assert self._directory is not None
        return [str(Path(self._directory.name) / f"metrics-{child.index}")
                for child in self.children]

    # -- the notify socket ---------------------------------------------------------------
    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="flowd-supervisor-")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(str(Path(self._directory.name) / "notify"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        self._socket = sock
        loop.add_reader(sock.fileno(), self._receive)

    def _receive(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self._socket.recvmsg(
                    4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return
            pid = next((_UCRED.unpack(payload[:_UCRED.size])[0]
                        for level, kind, payload in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS),
                       None)
            child = next((c for c in self.children
                          if c.process is not None and c.process.pid == pid), None)
            if child is None:
                continue  # a pool worker or a process that already left
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1":
                    child.ready = True
                    log.info("process ready", index=child.index, pid=pid)
                if line in ("READY=1", "WATCHDOG=1"):
                    child.last_ping = time.monotonic()

    def _check_health(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if (child.ready and process is not None and process.returncode is None
                    and now - child.last_ping > HUNG_AFTER_S):
                log.error("process stopped answering; killing it", index=child.index,
                          pid=process.pid, silent_s=round(now - child.last_ping, 1))
                process.kill()  # _watch restarts it
                child.ready = False
        ready = [c for c in self.children if c.ready]
        if len(ready) == len(self.children) and not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(f"{len(ready)} processes ready")
            log.info("ready", processes=len(ready))
        healthy = all(c.ready and now - c.last_ping < 2 * CHILD_WATCHDOG_USEC / 1e6
                      for c in self.children)
        if healthy and self.notifier.watchdog_interval:
            self.notifier.watchdog()


def child_index() -> int | None:
    """This process's index when a supervisor started it, else None."""
    value = os.environ.get("FLOWD_PROCESS_INDEX")
    return int(value) if value is not None and value.isdigit() else None


def child_metrics_socket() -> str | None:
    """In a child: the Unix socket to serve /metrics and /healthz on, for the supervisor."""
    return os.environ.get("FLOWD_METRICS_SOCKET")


def follow_supervisor() -> bool:
    """In a child: be sent SIGTERM (drain, then exit) when the supervisor dies, even by
    SIGKILL, so no orphan keeps consuming beside the next supervisor's children. False if
    the supervisor is already gone."""
    lifeline.die_with_parent(signal.SIGTERM)
    return str(os.getppid()) == os.environ.get("FLOWD_SUPERVISOR_PID")
