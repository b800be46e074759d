"""A flow's desired state (running, paused, draining), kept in Redis and followed by every
daemon that runs the flow, on any host.

What this module guarantees:
- The state is kept per consumer group: the field "GROUP:STREAM" of the hash `DESIRED_KEY`
  on the Redis the flow reads. Every daemon consuming that group follows one state, whatever
  its config calls the flow; no field means running. It is state, not routing: the config
  still says what a flow reads and writes.
- A daemon reads the states of all its flows on one server in one call per interval
  (`[daemon] control_interval_s`, 0.5 s by default): a script that answers with the server's
  clock and one HMGET. A change is applied at the first read that sees it.
- Paused: the batches in hand are finished and committed; nothing more is read (neither the
  consumer's own pending entries, nor a dead consumer's, nor new ones). Draining: the
  consumer's own pending entries and a dead consumer's idle ones are finished; no new entry
  is read. Until a daemon has read the state once, its flows read nothing: a daemon started
  while its flow is paused stays paused.
- Each change applied is recorded (`Applied`: what was asked, by whom and when, and the
  server time of the read that saw it and of the read before), once the flow's reader is
  out of any read it was in: from then on that daemon reads nothing for a paused flow. The
  registry (flowd.registry) publishes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import redis
import redis.asyncio as aioredis
import structlog

from flowd.config import FlowConfig
from flowd.retry import describe

if TYPE_CHECKING:
    from flowd.consumer import FlowConsumer

__all__ = ["DESIRED_KEY", "DRAINING", "PAUSED", "RUNNING", "STATES", "Applied", "Control",
           "Desired", "field_of", "operator", "read_desired", "set_desired"]

log = structlog.get_logger(__name__)

RUNNING, PAUSED, DRAINING = "running", "paused", "draining"
STATES = (RUNNING, PAUSED, DRAINING)
# One hash per Redis server; the hash tag keeps it in one slot of a Redis Cluster.
DESIRED_KEY = "flowd:{control}:desired"
SETTLE_TIMEOUT_S = 5.0  # a reader leaves a read at once, or within its block (1 s) alone

# KEYS[1]: DESIRED_KEY; ARGV: field, state, who. The time is the server's, so every daemon
# and operator compares it with the same clock.
_SET = """
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({state = ARGV[2], by = ARGV[3], at = at}))
return at
"""

# KEYS[1]: DESIRED_KEY; ARGV: the fields. The server's time (ms), then the values.
_POLL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if #ARGV == 0 then return {now, {}} end
return {now, redis.call('HMGET', KEYS[1], unpack(ARGV))}
"""


@dataclass(frozen=True, slots=True)
class Desired:
    """What was asked for a flow: the state, who asked and when (Redis time, ms; 0: never
    asked, the flow runs)."""

    state: str = RUNNING
    by: str = ""
    at_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "by": self.by, "at_ms": self.at_ms}


@dataclass(frozen=True, slots=True)
class Applied:
    """A change a daemon applied: `desired`, seen by the read at `seen_at_ms` (the read
    before was at `previous_read_ms`; both Redis time)."""

    desired: Desired
    seen_at_ms: int
    previous_read_ms: int

    def as_dict(self) -> dict[str, Any]:
        return {**self.desired.as_dict(), "seen_at_ms": self.seen_at_ms,
                "previous_read_ms": self.previous_read_ms}


def field_of(flow: FlowConfig) -> str:
    return f"{flow.group}:{flow.stream}"


def parse(value: bytes | str | None) -> Desired | None:
    """A field's value; None when it is not one flowd wrote (a hand edit)."""
    if value is None:
        return Desired()
    try:
        data = orjson.loads(value)
        state = data["state"]
        if state not in STATES:
            return None
        return Desired(state=state, by=str(data.get("by", "")), at_ms=int(data.get("at", 0)))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def operator() -> str:
    """Who is asking, for the record: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


def set_desired(client: redis.Redis, flow: FlowConfig, state: str, by: str) -> int:
    """Ask every daemon running `flow` to follow `state`; the Redis time it was asked at."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}: one of {', '.join(STATES)}")
    return int(client.eval(_SET, 1, DESIRED_KEY, field_of(flow), state, by))


def read_desired(client: redis.Redis, flows: Sequence[FlowConfig]) -> dict[str, Desired]:
    """Each flow's desired state, by flow name (a hand-edited value reads as running)."""
    if not flows:
        return {}
    values = client.hmget(DESIRED_KEY, [field_of(flow) for flow in flows])
    return {flow.name: parse(value) or Desired() for flow, value in
            zip(flows, values, strict=True)}


class Control:
    """Follows the desired state of the daemon's flows (see the module's docstring)."""

    def __init__(self, clients: Callable[[str], aioredis.Redis],
                 consumers: Callable[[], Mapping[str, FlowConsumer]], *, interval_s: float,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self._clients = clients  # the client of a Redis server, by name
        self._consumers = consumers
        self.interval_s = interval_s
        self._on_change = on_change
        self.reads = 0  # calls answered, all servers together
        self.applied: dict[str, Applied] = {}  # by flow name
        self._last_read_ms: dict[str, int] = {}  # by server
        self._failing: set[str] = set()  # servers whose last read failed (logged once)
        self._warned: set[tuple[str, bytes | str]] = set()  # hand-edited values, logged once

    async def run(self) -> None:
        while True:
            await self.read_once()
            await asyncio.sleep(self.interval_s)

    async def read_once(self) -> None:
        """Read every server's states once and apply what changed."""
        by_server: dict[str, list[FlowConsumer]] = {}
        for consumer in self._consumers().values():
            by_server.setdefault(consumer.flow.server, []).append(consumer)
        changed = await asyncio.gather(*(self._follow(server, consumers)
                                         for server, consumers in by_server.items()))
        if any(changed):
            self._on_change()

    async def _follow(self, server: str, consumers: list[FlowConsumer]) -> bool:
        try:
            now_ms, values = await self._clients(server).eval(
                _POLL, 1, DESIRED_KEY, *(field_of(c.flow) for c in consumers))
        except Exception as exc:  # the last state applied stays; the next read retries
            if server not in self._failing:
                self._failing.add(server)
                log.warning("cannot read the flows' desired state; they keep the state they "
                            "had", server=server or "default", error=describe(exc))
            return False
        if server in self._failing:
            self._failing.discard(server)
            log.info("reading the flows' desired state again", server=server or "default")
        self.reads += 1
        previous_ms, self._last_read_ms[server] = self._last_read_ms.get(server, 0), int(now_ms)
        settling, noted = [], False
        for consumer, value in zip(consumers, values, strict=True):
            desired = self._parse(consumer, value)
            if desired is None:
                continue
            applied = Applied(desired, int(now_ms), previous_ms)
            if desired.state != consumer.reader.state:
                consumer.reader.set_state(desired.state)
                settling.append((consumer, applied))
            elif (known := self.applied.get(consumer.flow.name)) is None or \
                    known.desired != desired:  # asked again for the state it is in
                self.applied[consumer.flow.name] = applied
                noted = True
        for consumer, applied in settling:
            with contextlib.suppress(TimeoutError):  # (not wait_for: see flowd.registry)
                async with asyncio.timeout(SETTLE_TIMEOUT_S):
                    await consumer.reader.quiet()
            self.applied[consumer.flow.name] = applied
            log.info(f"flow {applied.desired.state}", flow=consumer.flow.name,
                     stream=consumer.flow.stream, group=consumer.flow.group,
                     asked_by=applied.desired.by or None,
                     asked_ms_ago=max(0, applied.seen_at_ms - applied.desired.at_ms)
                     if applied.desired.at_ms else None)
        return bool(settling) or noted

    def _parse(self, consumer: FlowConsumer, value: bytes | str | None) -> Desired | None:
        desired = parse(value)
        if desired is None:
            if (consumer.flow.name, value) not in self._warned:  # type: ignore[arg-type]
                self._warned.add((consumer.flow.name, value))  # type: ignore[arg-type]
                log.error("the flow's desired state is not one flowd wrote; it keeps the "
                          "state it had (set it with flowd pause/resume/drain)",
                          flow=consumer.flow.name, key=DESIRED_KEY, field=field_of(
                              consumer.flow), value=repr(value)[:100])
            # A daemon starting on a hand edit runs, as it would with no field at all.
            return Desired() if consumer.reader.state is None else None
        return desired
