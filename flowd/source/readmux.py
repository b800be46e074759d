"""One blocking read for many idle flows: XREADGROUP ... BLOCK over all their streams.

A daemon with hundreds of flows cannot give each its own blocking read: every one would
hold a connection for its BLOCK and poll Redis once a second. Instead, a flow whose stream
is empty waits here (`ReadMux.read`), and every flow with the same consumer name and group
(and, in Redis Cluster, the same hash slot: one call cannot span slots) waits in one
XREADGROUP call, on a connection of the blocking-read pool that commands never use.

What this module guarantees:
- Entries a call returns were delivered to the consumer (they are in its pending list);
  each one goes to the flow it was read for, as the result of that flow's `read`. A flow is
  a member of a call from the moment it is sent until its reply is in: a flow that stops
  meanwhile ends the call (CLIENT UNBLOCK) and still receives what it returned. Only a
  read that is cancelled (a flow abandoned at a timeout) leaves entries behind in the
  process; they stay pending, and the consumer reads them again from its own pending list.
- No flow receives more than its batch: COUNT is the smallest batch among the members.
- A flow that starts waiting while a call is in flight is added at once (the call is
  unblocked and sent again with it), or, when flows come and go all the time, within
  `JOIN_COALESCE_S`: they share restarts. A stop ends the call at once.
- A failed call is reported to every member as the error (a reply lost on the way may have
  delivered entries: the reader reads its pending list again), except a refused one
  (an error reply: Redis delivered nothing), whose members each read alone next.
- Waiting flows are not left without housekeeping: every few seconds one script per channel
  (`PROBE`) checks each member's group for entries idle past `claim_idle_ms` (a dead
  consumer's, to claim) and its outputs for `max_len` (backpressure), and sends those
  flows back to their reader. Idle flows cost one call a second per channel, not per flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from flowd.core.lua import Lua
from flowd.core.replies import Entry
from flowd.source.group import read_reply

__all__ = ["IDLE_BLOCK_MS", "PROBE", "ReadMux", "Shared", "Want"]

log = structlog.get_logger(__name__)

IDLE_BLOCK_MS = 1000  # the longest one read blocks: a missed wake-up costs at most this
CONTENDED_BLOCK_MS = 100  # when more channels than connections wait: take turns faster
JOIN_COALESCE_S = 0.01  # a call is restarted for joining flows at most this often
UNBLOCK_ATTEMPTS = 5  # CLIENT UNBLOCK can arrive before the read it is for blocks
CLAIM_PROBE_MAX_S = 5.0  # look for claimable entries at least this often
BACKPRESSURE_PROBE_S = 1.0  # how often a waiting flow's max_len outputs are measured
REFUSED_PAUSE_CAP_S = 2.0  # a channel whose call is refused waits this long at most

# For each member (KEYS: its stream, then its max_len outputs; ARGV: the member count, then
# per member its group, claim_idle_ms, output count and their max_len): 1 when the group
# holds an entry idle that long (or the check failed: the reader's XAUTOCLAIM finds out
# why), plus 2 when an output stream is at its max_len.
PROBE = Lua(r"""
local flags, k, a = {}, 1, 2
for i = 1, tonumber(ARGV[1]) do
  local flag = 0
  local idle = redis.pcall('XPENDING', KEYS[k], ARGV[a], 'IDLE', ARGV[a + 1], '-', '+', 1)
  if type(idle) ~= 'table' or idle['err'] or #idle > 0 then flag = 1 end
  local outputs, full = tonumber(ARGV[a + 2]), false
  k, a = k + 1, a + 3
  for _ = 1, outputs do
    local length = redis.pcall('XLEN', KEYS[k])
    if type(length) == 'number' and length >= tonumber(ARGV[a]) then full = true end
    k, a = k + 1, a + 1
  end
  if full then flag = flag + 2 end
  flags[i] = flag
end
return flags
""")

PoolFactory = Callable[[tuple[str, int] | None], BlockingConnectionPool]


@dataclass(frozen=True, slots=True)
class Want:
    """What one flow waits for: new entries of `stream` for `consumer` in `group`."""

    stream: str
    group: str
    consumer: str
    count: int  # the flow's batch
    claim_idle_ms: int
    limits: tuple[tuple[str, int], ...] = ()  # (output stream, max_len) to watch


@dataclass(frozen=True, slots=True)
class Shared:
    """A flow's turn: the entries read for it (maybe none) and why it was sent back."""

    entries: list[Entry] = field(default_factory=list)
    read_at: float = 0.0  # when the call that delivered them was sent (monotonic)
    claim: bool = False  # entries idle past claim_idle_ms wait in the group
    full: bool = False  # an output stream is at its max_len


def _never() -> float | None:
    return None


@dataclass(eq=False, slots=True)
class _Wait:
    want: Want
    until: Callable[[], float | None]  # leave at the first call end after this
    future: asyncio.Future[Shared]
    call: int = 0  # the call in flight this wait is a member of (0: none)
    leaving: bool = False


class _Lane:
    """The blocking-read connections to one server, and the way to unblock one."""

    def __init__(self, pool: BlockingConnectionPool,
                 unblock: Callable[[int], Awaitable[Any]]) -> None:
        self.pool = pool
        self.unblock = unblock
        self.users = 0  # channels in a call or waiting for a connection
        self.identify = True  # CLIENT ID allowed (an ACL may refuse it)

    def block_ms(self) -> int:
        return CONTENDED_BLOCK_MS if self.users >= self.pool.max_connections \
            else IDLE_BLOCK_MS

    async def call(self, args: list[Any], client_id: asyncio.Future[int]) -> Any:
        """Send `args` on a connection of its own, after CLIENT ID (its answer, which
        arrives once the read reached the server, resolves `client_id`)."""
        self.users += 1
        try:
            connection = await self.pool.get_connection()
            try:
                return await self._send(connection, args, client_id)
            finally:
                await self.pool.release(connection)
        finally:
            self.users -= 1

    async def _send(self, connection: Connection, args: list[Any],
                    client_id: asyncio.Future[int]) -> Any:
        if not self.identify:
            await connection.send_packed_command(connection.pack_command(*args))
            return await connection.read_response()
        await connection.send_packed_command(
            connection.pack_commands([("CLIENT", "ID"), args]))
        try:
            identity = await connection.read_response()
        except ResponseError as exc:
            # The read went out behind it and may have delivered entries: drop its reply
            # with the connection and report a lost read (the readers re-read pending).
            self.identify = False
            await connection.disconnect()
            log.warning("CLIENT ID refused: shared reads cannot be woken early",
                        error=str(exc))
            raise RedisConnectionError(f"CLIENT ID refused: {exc}") from exc
        if not client_id.done():
            client_id.set_result(int(identity))
        return await connection.read_response()


class _Channel:
    """The flows that can share one call, and the task that makes their calls."""

    def __init__(self, mux: ReadMux) -> None:
        self.mux = mux
        self.waits: dict[str, _Wait] = {}
        self.runner: asyncio.Task[None] | None = None
        self.call = 0  # the call in flight (0: none)
        self.lane: _Lane | None = None  # its lane
        self.client_id: asyncio.Future[int] | None = None  # its connection's client id
        self.unblock_call, self.unblock_at = 0, 0.0
        self.unblocked_at = 0.0  # when the last unblock was sent
        self.next_probe = 0.0
        self.refusals = 0
        self.resume_at = 0.0  # after a refused call

    # -- what readers do ---------------------------------------------------------------
    def join(self, wait: _Wait) -> None:
        self.waits[wait.want.stream] = wait
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run(), name="shared-read")
        elif self.call:
            self._request_unblock(max(0.0, self.unblocked_at + JOIN_COALESCE_S
                                      - time.monotonic()))

    def leave(self, wait: _Wait) -> None:
        """Stop waiting: at once, or when the call it is a member of ends (soon)."""
        if wait.call and wait.call == self.call:
            wait.leaving = True
            self._request_unblock(0.0)
        else:
            self._resolve(wait, Shared())

    def abandon(self, wait: _Wait) -> None:
        """A cancelled read: whatever its call still returns stays pending in Redis."""
        wait.leaving = True
        if self.waits.get(wait.want.stream) is wait:
            del self.waits[wait.want.stream]

    def _resolve(self, wait: _Wait, result: Shared) -> None:
        if self.waits.get(wait.want.stream) is wait:
            del self.waits[wait.want.stream]
        if not wait.future.done():
            wait.future.set_result(result)
        elif result.entries:
            log.warning("entries read for a flow that stopped waiting stay pending; its "
                        "consumer reads them again from its pending list",
                        stream=wait.want.stream, count=len(result.entries))

    def _fail(self, wait: _Wait, exc: BaseException) -> None:
        if self.waits.get(wait.want.stream) is wait:
            del self.waits[wait.want.stream]
        if not wait.future.done():
            wait.future.set_exception(exc)

    # -- the calls ---------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                self._settle()
                if not self.waits:
                    return
                if (pause := self.resume_at - time.monotonic()) > 0:
                    await asyncio.sleep(pause)
                elif time.monotonic() >= self.next_probe:
                    await self._probe()
                else:
                    await self._call()
        except Exception as exc:  # a bug here must not leave readers waiting forever
            log.error("shared read failed", error=repr(exc), exc_info=exc)
            for wait in list(self.waits.values()):
                self._fail(wait, exc)

    def _settle(self) -> None:
        """Send back the waits that are leaving, or whose `until` has passed."""
        now = time.monotonic()
        for wait in list(self.waits.values()):
            until = wait.until()
            if wait.leaving or wait.future.done() or (until is not None and until <= now):
                self._resolve(wait, Shared())

    async def _call(self) -> None:
        members = dict(self.waits)
        self.call = call = next(self.mux.calls)
        for wait in members.values():
            wait.call = call
        self.client_id = asyncio.get_running_loop().create_future()
        try:
            self.lane = lane = self.mux.lane_for(next(iter(members)))
            first = next(iter(members.values())).want
            args = ["XREADGROUP", "GROUP", first.group, first.consumer,
                    "COUNT", min(wait.want.count for wait in members.values()),
                    "BLOCK", lane.block_ms(), "STREAMS", *members, *[">"] * len(members)]
            sent_at = time.monotonic()
            reply = await lane.call(args, self.client_id)
        except ResponseError as exc:
            self._refused(members, exc)
        except Exception as exc:
            for wait in members.values():
                self._fail(wait, exc)
        else:
            self.refusals = 0
            self._distribute(members, reply, sent_at)
        finally:
            self.call = 0
            self.client_id.cancel()
            for wait in members.values():
                wait.call = 0

    def _distribute(self, members: dict[str, _Wait], reply: Any, sent_at: float) -> None:
        for stream, got in read_reply(reply).items():
            wait = members.get(stream)
            if wait is None:  # cannot happen: Redis answers for the streams it was asked
                log.error("a shared read answered for a stream it did not read",
                          stream=stream, count=len(got))
                continue
            self._resolve(wait, Shared(got, sent_at))

    def _refused(self, members: dict[str, _Wait], exc: ResponseError) -> None:
        """An error reply delivered nothing. Alone, the flow sees the error; together,
        each member reads alone next, and the one at fault finds its error there."""
        if len(members) == 1:
            for wait in members.values():
                self._fail(wait, exc)
            return
        self.refusals += 1
        pause = min(REFUSED_PAUSE_CAP_S, 0.05 * 2 ** (self.refusals - 1))
        self.resume_at = time.monotonic() + pause
        log.warning("a shared read was refused; its flows read alone once",
                    error=str(exc), streams=len(members), pause_s=pause)
        for wait in members.values():
            self._resolve(wait, Shared())

    async def _probe(self) -> None:
        """Send back the waits with claimable entries or a full output (see PROBE)."""
        waits = list(self.waits.values())
        every = min(CLAIM_PROBE_MAX_S, *(w.want.claim_idle_ms / 2000 for w in waits))
        if any(w.want.limits for w in waits):
            every = min(every, BACKPRESSURE_PROBE_S)
        self.next_probe = time.monotonic() + every
        keys: list[str] = []
        args: list[Any] = [len(waits)]
        for wait in waits:
            want = wait.want
            keys.append(want.stream)
            args += [want.group, want.claim_idle_ms, len(want.limits)]
            for stream, max_len in want.limits:
                keys.append(stream)
                args.append(max_len)
        try:
            flags = await PROBE(self.mux.commands, keys, args)
        except Exception as exc:  # let each reader look for itself
            log.warning("cannot probe waiting flows; each checks its own group",
                        error=repr(exc), streams=len(waits))
            flags = [3] * len(waits)
        for wait, flag in zip(waits, flags, strict=False):
            if int(flag) and self.waits.get(wait.want.stream) is wait:
                self._resolve(wait, Shared(claim=bool(int(flag) & 1),
                                           full=bool(int(flag) & 2)))

    def _request_unblock(self, delay: float) -> None:
        """End the call in flight within `delay` (it is then sent again, or not)."""
        at = time.monotonic() + delay
        if self.unblock_call == self.call and self.unblock_at <= at:
            return  # one is due sooner already
        self.unblock_call, self.unblock_at = self.call, at
        if self.lane is not None and self.client_id is not None:
            self.mux.spawn(self._unblock(self.call, self.lane, self.client_id, delay))

    async def _unblock(self, call: int, lane: _Lane, client_id: asyncio.Future[int],
                       delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await asyncio.wait([client_id])
        if client_id.cancelled():  # the call ended (or was never identified)
            return
        for attempt in range(UNBLOCK_ATTEMPTS):
            if self.call != call:
                return
            try:
                self.unblocked_at = time.monotonic()
                if await lane.unblock(client_id.result()):
                    return
            except Exception as exc:  # the call still ends by its BLOCK
                log.debug("cannot unblock a shared read", error=repr(exc))
                return
            await asyncio.sleep(0.002 * 2 ** attempt)  # not blocked yet: it soon will be


class ReadMux:
    """The shared reads of one daemon (one Redis, or one Redis Cluster)."""

    def __init__(self, commands: aioredis.Redis | RedisCluster, pools: PoolFactory) -> None:
        self.commands = commands  # for CLIENT UNBLOCK and the probes, never blocked
        self._pools = pools  # blocking-read pool of the server (None) or a node (host, port)
        self._lanes: dict[str, _Lane] = {}
        self._channels: dict[tuple[Any, ...], _Channel] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.calls = itertools.count(1)

    async def read(self, want: Want, *, stopping: asyncio.Event,
                   until: Callable[[], float | None] = _never,
                   halted: asyncio.Event | None = None) -> Shared:
        """Wait for new entries of `want.stream`, until some arrive, `stopping` (or
        `halted`: the flow is paused) is set, the time `until()` returns passes (checked
        once a second), or housekeeping is due."""
        ends = [stopping, *([halted] if halted is not None else [])]
        if any(end.is_set() for end in ends):
            return Shared()
        channel = self._channel_for(want)
        wait = _Wait(want, until, asyncio.get_running_loop().create_future())
        channel.join(wait)
        stops = [asyncio.ensure_future(end.wait()) for end in ends]
        try:
            await asyncio.wait([wait.future, *stops], return_when=asyncio.FIRST_COMPLETED)
            if not wait.future.done():
                channel.leave(wait)
            return await wait.future
        finally:
            for stop in stops:
                stop.cancel()
            if not wait.future.done():
                channel.abandon(wait)
                wait.future.cancel()

    def _channel_for(self, want: Want) -> _Channel:
        slot = self.commands.keyslot(want.stream) if isinstance(self.commands, RedisCluster) \
            else None
        key: tuple[Any, ...] = (want.consumer, want.group, slot)
        channel = self._channels.get(key)
        if channel is not None and want.stream in channel.waits:
            key = (*key, want.stream)  # the same stream twice: never in one call
            channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = _Channel(self)
        return channel

    def lane_for(self, stream: str) -> _Lane:
        if not isinstance(self.commands, RedisCluster):
            if (lane := self._lanes.get("")) is None:
                unblock = partial(self.commands.execute_command, "CLIENT", "UNBLOCK")
                lane = self._lanes[""] = _Lane(self._pools(None), unblock)
            return lane
        node = self.commands.get_node_from_key(stream)
        if (lane := self._lanes.get(node.name)) is None:
            unblock = partial(self.commands.execute_command, "CLIENT", "UNBLOCK",
                              target_nodes=node)
            lane = self._lanes[node.name] = _Lane(self._pools((node.host, int(node.port))),
                                                  unblock)
        return lane

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        runners = [c.runner for c in self._channels.values() if c.runner is not None]
        for task in (*runners, *self._tasks):
            task.cancel()
        await asyncio.gather(*runners, *self._tasks, return_exceptions=True)
        for lane in self._lanes.values():
            with contextlib.suppress(Exception):
                await lane.pool.disconnect()
