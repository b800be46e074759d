"""What a Redis server can do that flowd uses when it is there: found by asking the server.

Guarantees:
- `native_ackdel` is true only when the server itself ran `XACKDEL KEY GROUP ACKED IDS 1
  ID` (on a key that does not exist: nothing is acked or deleted) and answered with one
  code per id, as Redis 8.2 and newer do (Valkey 9.1 has no XACKDEL), so the commit script
  (commit.py) never sends a command the server does not have.
- Either path keeps `delete_acked`'s promise: an entry is deleted only when no group on the
  stream still needs it (none has it pending, every group has been given it), and every
  entry the trim below the oldest needed entry deletes on an older server is still deleted.
- A server that cannot be asked (unreachable, a cluster node that refuses COMMAND) gets the
  portable path: nothing is assumed about it. A client's answer is cached for its lifetime
  (one question per client, asked before its first commit); `forget` drops it, e.g. after a
  server answered that it does not know XACKDEL after all (a failover to an older server).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
import structlog

from flowd.core.config import Config
from flowd.core.replies import text

__all__ = ["Features", "check_lines", "describe", "detect", "detect_sync", "forget",
           "from_replies"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Features:
    """The server's name and version, and whether the commit may use XACKDEL ... ACKED."""

    server: str = "redis"  # "redis" or "valkey"
    version: str = ""
    native_ackdel: bool = False

    @property
    def label(self) -> str:
        """"Redis 8.2.3", "Valkey 9.1.2", or "an unknown server"."""
        if not self.version:
            return "an unknown server"
        return f"{self.server.capitalize()} {self.version}"


PORTABLE = Features()
_cache: weakref.WeakKeyDictionary[Any, Features] = weakref.WeakKeyDictionary()


# XACKDEL on a key that never exists: acks nothing, deletes nothing, creates nothing.
PROBE = ("XACKDEL", "flowd:features:probe", "flowd", "ACKED", "IDS", "1", "0-1")


def from_replies(info: dict[str, Any], probe: Any) -> Features:
    """Features from `INFO server` (as redis-py parses it) and the reply to PROBE (the
    exception it raised, when it did: an unknown command, no permission)."""
    server = text(info.get("server_name", "redis")) or "redis"
    version = text(info.get(f"{server}_version") or info.get("redis_version", ""))
    native = isinstance(probe, list | tuple) and len(probe) == 1 and int(probe[0]) == -1
    return Features(server, version, native)


# A refusal is an answer (unknown command, no permission; a cluster client that finds no
# XACKDEL in the server's COMMAND table says so before sending it); a lost connection is not.
_NO_ANSWER = (redis.ConnectionError, redis.TimeoutError)


def _probe_sync(client: Any) -> Any:
    try:
        return client.execute_command(*PROBE)
    except _NO_ANSWER:
        raise
    except redis.RedisError as exc:
        return exc


async def _probe(client: Any) -> Any:
    try:
        return await client.execute_command(*PROBE)
    except _NO_ANSWER:
        raise
    except redis.RedisError as exc:
        return exc


async def detect(client: aioredis.Redis | Any) -> Features:
    """The features of the server behind `client`, asked once per client and cached."""
    known = _cache.get(client)
    if known is not None:
        return known
    try:
        found = from_replies(_one_node(await client.info("server")), await _probe(client))
    except (redis.RedisError, OSError, ValueError, TypeError) as exc:
        log.warning("could not ask the server what it supports; using the portable path",
                    error=str(exc))
        return PORTABLE  # not cached: asked again at the next commit
    _cache[client] = found
    log.info("redis features", server=found.label, delete_acked=describe(found))
    return found


def detect_sync(client: redis.Redis | Any) -> Features:
    """As `detect`, for a blocking client (flowd check); not cached. Raises what the
    client raises when the server cannot be reached."""
    return from_replies(_one_node(client.info("server")), _probe_sync(client))


def forget(client: Any) -> None:
    """Ask again at the next commit (the server answered as if it had changed)."""
    _cache.pop(client, None)


def _one_node(info: Any) -> dict[str, Any]:
    """A cluster client answers INFO per node ({node: info}); the first node's speaks for
    the cluster (a node without XACKDEL is caught by the commit's fallback)."""
    if isinstance(info, dict) and info and all(isinstance(v, dict) for v in info.values()):
        return next(iter(info.values()))
    return info


def describe(found: Features) -> str:
    """How `delete_acked` is done on that server, for logs and flowd check."""
    if found.native_ackdel:
        return (f"delete_acked by XACKDEL ACKED ({found.label}), and the trim below the "
                f"oldest entry any group still needs")
    why = "" if not found.version else ": no XACKDEL"
    return (f"delete_acked by XACK + trim below the oldest entry any group still needs "
            f"({found.label}{why})")


def check_lines(config: Config) -> list[str]:
    """For `flowd check`: the delete_acked path of every Redis a flow reads, asked of the
    server; one that cannot be asked fails nothing ("decided at start")."""
    from flowd.core.connections import connect_redis_sync, safe_url

    lines = []
    for server in dict.fromkeys(flow.server for flow in config.flows):
        redis_config = config.redis_for(server)
        name = f' "{server}"' if server else ""
        place = f"redis{name} ({safe_url(redis_config.url)})"
        try:
            client = connect_redis_sync(redis_config, decode_responses=False,
                                        socket_timeout=3, connect_timeout=2)
            try:
                lines.append(f"{place}: {describe(detect_sync(client))}")
            finally:
                client.close()
        except (redis.RedisError, OSError):
            lines.append(f"{place}: not reachable: decided at start")
    return lines
