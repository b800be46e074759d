"""Which consumers of a group belong to daemons known to be dead, so their entries can be
taken over at once instead of after `claim_idle_ms`.

What this module guarantees:
- A consumer is called dead only on evidence from the registry (flowd.admin.registry), and only
  when its name is never reused by another process (the consumer template has `{pid}`:
  the registry record says `name_unique`), so a restart under the same name can never be
  raced: such a daemon finds its own pending entries itself.
- The evidence, in order: the daemon stopped cleanly (its record says so); it ran on this
  machine (same boot and pid namespace) and its process is gone (pid not running, or
  running with another start time: the pid was reused); it ran elsewhere and its record
  expired (not refreshed for `registry_ttl_s`). A daemon on this machine whose process is
  still there — frozen, swapping, starved — is never called dead, whatever its record.
- A daemon elsewhere that is frozen past its record's expiry is taken over; its own writes
  are fenced (`Registry.vouched_until`): it sends no insert once its record may have
  expired, as with `claim_idle_ms`.
- A consumer the registry does not know (no record: an older flowd, another tool) is left
  to the claim after `claim_idle_ms`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from cachetools import TTLCache

from flowd.core.keys import LIVE_PREFIX, RECORDS

__all__ = ["Liveness", "process_identity", "verdict"]

VERDICT_TTL_S = 1.0  # flows asking about the same consumers share one look per second


@cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: no machine identity, so no pid evidence either
        return ""


@cache
def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); None
    when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:  # a process we may not look at: it exists
        return -1
    fields = stat.rpartition(")")[2].split()  # the name may hold spaces and parentheses
    try:
        return int(fields[19]) if fields[0] != "Z" else None  # a zombie has exited
    except (IndexError, ValueError):
        return -1


def process_identity() -> dict[str, Any]:
    """What lets a daemon on the same machine tell whether this process still runs."""
    return {"boot_id": _boot_id(), "pid_ns": _pid_namespace(),
            "proc_start": _start_ticks(os.getpid())}


def verdict(record: dict[str, Any], live: bool, now: float | None = None) -> str | None:
    """Why the daemon of `record` is known to be dead, or None (alive, or not known)."""
    if not record.get("name_unique"):
        return None
    if record.get("state") == "stopped" and not live:
        return "its daemon stopped"
    same_machine = bool(record.get("boot_id")) and record.get("boot_id") == _boot_id() \
        and record.get("pid_ns") == _pid_namespace()
    if same_machine:
        pid = record.get("pid")
        if not isinstance(pid, int):
            return None
        started = _start_ticks(pid)
        if started is None:
            return f"its process (pid {pid} on this machine) is gone"
        if started != -1 and record.get("proc_start") not in (None, started):
            return f"its process (pid {pid} on this machine) is gone; the pid was reused"
        return None  # the process is there: frozen or slow is not dead
    if not live:
        ago = (now or time.time()) - float(record.get("refreshed_at") or 0)
        return f"its registry record expired (last refreshed {ago:.0f}s ago)"
    return None


@dataclass(frozen=True, slots=True)
class _Look:
    reason: str | None


class Liveness:
    """Asks the registry (on `client`, the unnamed Redis) about consumers by name."""

    def __init__(self, client: aioredis.Redis, me: str) -> None:
        self._client = client
        self._me = me
        self._looks: TTLCache[str, _Look] = TTLCache(maxsize=4096, ttl=VERDICT_TTL_S)

    async def dead(self, names: Iterable[str]) -> dict[str, str]:
        """Of `names`, those known to be dead, with the reason."""
        wanted = [name for name in dict.fromkeys(names)
                  if name != self._me and name not in self._looks]
        if wanted:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hmget(RECORDS, wanted)
                for name in wanted:
                    pipe.exists(LIVE_PREFIX + name)
                raw, *alive = await pipe.execute()
            now = time.time()
            for name, record, live in zip(wanted, raw, alive, strict=True):
                self._looks[name] = _Look(_judge(record, bool(live), now))
        return {name: look.reason for name in names
                if (look := self._looks.get(name)) is not None and look.reason is not None}


def _judge(raw: bytes | None, live: bool, now: float) -> str | None:
    if raw is None:
        return None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return verdict(record, live, now) if isinstance(record, dict) else None
