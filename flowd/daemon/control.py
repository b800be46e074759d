"""Following each flow's desired state (flowd.core.states) on every Redis server a daemon
reads: one poll per server per interval, applied to the flow's reader once it is out of any
read it was in, and recorded for the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import structlog

from flowd.core.keys import DESIRED_KEY
from flowd.core.lua import Lua
from flowd.core.retry import describe
from flowd.core.states import Applied, Desired, field_of, parse

if TYPE_CHECKING:
    from flowd.pipeline.consumer import FlowConsumer

__all__ = ["Control"]

log = structlog.get_logger(__name__)

SETTLE_TIMEOUT_S = 5.0  # a reader leaves a read at once, or within its block (1 s) alone

# KEYS[1]: DESIRED_KEY; ARGV: the fields. The server's time (ms), then the values.
_POLL = Lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if #ARGV == 0 then return {now, {}} end
return {now, redis.call('HMGET', KEYS[1], unpack(ARGV))}
""")


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
            now_ms, values = await _POLL(self._clients(server), [DESIRED_KEY],
                                         [field_of(c.flow) for c in consumers])
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
            with contextlib.suppress(TimeoutError):  # (not wait_for: see flowd.admin.registry)
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
