"""The console's Redis, asked on threads, never on the loop that moves the data.

A small pool per server, one blocking client per server made on first use, with short
socket timeouts. A Redis that does not answer costs the request a 503 after at most
READ_TIMEOUT_S (a change: the caller's timeout); a read still running for an earlier
request is shared, not asked again, so a page polling a hung server holds one thread, not
one per poll. Also here: what runs on those threads (reading flows, listing and moving
dead letters).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import structlog

from flowd.admin import dlq
from flowd.admin.figures import server_label
from flowd.admin.status import FlowStatus, Unanswered, flow_status, redis_title
from flowd.core import states
from flowd.core.config import Config, FlowConfig
from flowd.core.connections import connect_redis_sync
from flowd.core.replies import text
from flowd.core.retry import describe
from flowd.http.console_requests import Refused

__all__ = ["READ_TIMEOUT_S", "RedisThreads", "list_letters", "move_letters", "read_server"]

log = structlog.get_logger(__name__)

SOCKET_TIMEOUT_S = 2.0  # one Redis command; a person is waiting
READ_TIMEOUT_S = 10.0  # one answer of a reading route, every command it needs together
MAX_VALUE_CHARS = 4096  # a dead letter's field shown longer than this is cut
THREADS_PER_SERVER = 2  # the flows' figures and a dead-letter list do not wait on each other


class RedisThreads:
    """Calls to the Redis servers of one config, each on a thread of its server."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._clients: dict[str, redis.Redis] = {}
        self._lock = threading.Lock()  # two threads of a server may make its client at once
        self._running: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._closed = False

    def refuse(self) -> None:
        """From now on, every call answers 503: the server is stopping."""
        self._closed = True

    def close(self) -> None:
        self.refuse()
        for server, client in list(self._clients.items()):  # on its own thread, after its call
            self._threads[server].submit(client.close)
        for executor in self._threads.values():
            executor.shutdown(wait=False)

    def _client(self, server: str) -> redis.Redis:
        """The blocking client of the Redis named `server` (bytes: a dead letter is kept
        byte for byte); on that server's threads only (a cluster client maps its slots as
        it is made, which blocks)."""
        with self._lock:
            client = self._clients.get(server)
            if client is None:
                client = self._clients[server] = connect_redis_sync(
                    self.config.redis_for(server), decode_responses=False,
                    socket_timeout=SOCKET_TIMEOUT_S, connect_timeout=SOCKET_TIMEOUT_S)
        return client

    async def call(self, server: str, fn: Callable[[redis.Redis], Any], *,
                    shared: tuple[str, ...] | None = None,
                    timeout: float = READ_TIMEOUT_S) -> Any:
        """`fn(client)` on a thread of `server`, waited for at most `timeout`; with `shared`
        (a read's name), a call of the same name still running is awaited instead."""
        if self._closed:
            raise Refused(503, "the server is stopping")
        if server not in self._threads:
            self._threads[server] = ThreadPoolExecutor(
                THREADS_PER_SERVER, thread_name_prefix=f"flowd-console-{server or 'default'}")
        running = self._running.get(shared) if shared is not None else None
        if running is None or running.done():
            running = asyncio.get_running_loop().run_in_executor(
                self._threads[server], lambda: fn(self._client(server)))
            running.add_done_callback(_retrieve)
            if shared is not None:
                self._running[shared] = running
        async with asyncio.timeout(timeout):
            return await asyncio.shield(running)

    def unreachable(self, server: str, exc: BaseException) -> str:
        reason = f"no answer within {READ_TIMEOUT_S:g}s" if type(exc) is TimeoutError else \
            describe(exc)
        return f"cannot reach {redis_title(server, self.config.redis_for(server).url)}: {reason}"

    async def guarded(self, server: str, fn: Callable[[redis.Redis], Any], *,
                       timeout: float = READ_TIMEOUT_S, **kwargs: Any) -> Any:
        """`call`, with a Redis that does not answer turned into a 503 for the request."""
        try:
            return await self.call(server, fn, timeout=timeout, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError) as exc:
            message = self.unreachable(server, exc)
            log.warning("console: Redis does not answer", server=server_label(server),
                        error=message)
            raise Refused(503, message) from None
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: a key holds something else
            raise Refused(409, f"Redis refused: {exc}") from None


def read_server(config: Config, server: str, client: redis.Redis,
                 ) -> tuple[dict[str, FlowStatus | dict[str, Any]], dict[str, states.Desired]]:
    """The status of every flow reading `server`, and their desired states. A flow whose
    stream key is not a stream (WRONGTYPE) gets its place with the error; the others
    their figures."""
    flows = [flow for flow in config.flows if flow.server == server]
    statuses: dict[str, FlowStatus | dict[str, Any]] = {}
    for flow in flows:
        try:
            statuses[flow.name] = flow_status(client, flow)
        except redis.ResponseError as exc:
            statuses[flow.name] = Unanswered(flow.name, flow.stream, flow.group, server,
                                             f'stream "{flow.stream}": {exc}').as_dict()
    return statuses, states.read_desired(client, flows)


def _shown(value: bytes) -> tuple[str, bool]:
    shown = text(value, "backslashreplace")
    if len(shown) <= MAX_VALUE_CHARS:
        return shown, False
    return f"{shown[:MAX_VALUE_CHARS]}… ({len(value)} bytes)", True


def _letter(letter: dlq.DeadLetter) -> dict[str, Any]:
    item = letter.as_dict()
    fields, cut = {}, []
    for key, value in letter.original.items():
        fields[text(key, "backslashreplace")], was_cut = _shown(value)
        if was_cut:
            cut.append(text(key, "backslashreplace"))
    item["fields"], item["truncated"] = fields, cut
    return item


def list_letters(client: redis.Redis, flow: FlowConfig,
                 count: int) -> tuple[int, list[dict[str, Any]]]:
    assert flow.dead_letter
    letters = []
    for letter in dlq.dead_letters(client, flow):
        if len(letters) >= count:
            break
        letters.append(_letter(letter))
    return int(client.xlen(flow.dead_letter)), letters


def move_letters(client: redis.Redis, flow: FlowConfig, ids: list[str],
                 action: str) -> dict[str, Any]:
    """Replay or purge the dead letters `ids`, all of them there, or nothing (404)."""
    present = {letter.id: letter for letter in dlq.dead_letters(client, flow, ids=ids)}
    if missing := [i for i in ids if i not in present]:
        raise Refused(404, f"{flow.dead_letter}: no dead letter of flow {flow.name!r} with "
                           f"id {', '.join(missing[:20])}; nothing was done", missing=missing)
    if action == "purge":
        return {"done": dlq.purge(client, flow, ids=ids), "kept": []}
    kept = [i for i in ids if not present[i].original]  # nothing to send back: purge them
    return {"done": dlq.replay(client, flow, ids=ids), "kept": kept}


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Consume the outcome of a call nobody waits for any more (it outlived its timeout)."""
    if not future.cancelled():
        future.exception()
