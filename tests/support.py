"""Test helpers: polling, producing entries, and real `flowd run` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import redis

T = TypeVar("T")


def wait_for(condition: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll until `condition()` is truthy; its value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                                 f"(last value: {value!r})")
        time.sleep(interval)


def flowd_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """A `flowd` command, its output captured."""
    return subprocess.run([sys.executable, "-m", "flowd", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def hub_entry(rec_id: int, task_for: str = "store", **data: Any) -> dict[str, str]:
    """One entry in the message-hub shape."""
    payload = {"a": rec_id, "b": f"text-{rec_id}", **data}
    return {"rec_id": str(rec_id), "task_for": task_for, "function_type": "demo",
            "data": orjson.dumps(payload).decode()}


def produce(client: redis.Redis, stream: str, entries: list[dict[str, Any]],
            chunk: int = 2000) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(entries), chunk):
        pipe = client.pipeline(transaction=False)
        for fields in entries[start:start + chunk]:
            pipe.xadd(stream, fields)
        ids.extend(i.decode() if isinstance(i, bytes) else i for i in pipe.execute())
    return ids


def pending_count(client: redis.Redis, stream: str, group: str) -> int:
    try:
        return int(client.xpending(stream, group)["pending"])
    except redis.ResponseError:  # no group yet
        return 0


FAULTY_FLOWD = Path(__file__).resolve().parent.parent / "scripts" / "faulty_flowd.py"


def flowd_command(env: dict[str, str] | None = None) -> list[str]:
    """How to start flowd: `python -m flowd`, or with the fault injection a test asks for
    in `env` (FLOWD_FAULT_*: scripts/faulty_flowd.py installs it as stage hooks)."""
    if any(name.startswith("FLOWD_FAULT_") for name in env or {}):
        return [sys.executable, str(FAULTY_FLOWD)]
    return [sys.executable, "-m", "flowd"]


class Flowd:
    """A real `flowd run` process with its log captured to a file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.process = subprocess.Popen(
            [*flowd_command(env), "run", "--config", str(config),
             "--log-format", "json", "--log-level", "debug"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def terminate(self, timeout: float = 60) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def all_acked(client: redis.Redis, stream: str, group: str, count: int) -> bool:
    """The group has read `count` entries and holds none pending."""
    if not client.exists(stream):
        return False
    for info in client.xinfo_groups(stream):
        if info["name"] == group:
            return info["entries-read"] == count and info["pending"] == 0
    return False


def descendants(pid: int) -> list[int]:
    """The processes under `pid` (a daemon's process pool: its forkserver and workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += (kids := children.get(todo.pop(), []))
        todo += kids
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def cmdline(pid: int) -> str:
    """The command line of `pid`, "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def crash(daemon: Flowd) -> None:
    """SIGKILL the daemon, then its pool (which the kernel kills too, flowd.core.lifeline: this
    makes sure, for tests that are about something else)."""
    pool = descendants(daemon.pid)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    for pid in pool:
        with contextlib.suppress(ProcessLookupError):  # pool processes may end anyway
            os.kill(pid, signal.SIGKILL)
