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
  registry (flowd.admin.registry) publishes it at once.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from flowd.core.config import FlowConfig
from flowd.core.keys import DESIRED_KEY
from flowd.core.lua import Lua

__all__ = ["DRAINING", "PAUSED", "RUNNING", "STATES", "Applied", "Desired", "field_of", "operator",
           "parse", "read_desired", "set_desired", "set_state"]

RUNNING, PAUSED, DRAINING = "running", "paused", "draining"
STATES = (RUNNING, PAUSED, DRAINING)

# KEYS[1]: DESIRED_KEY; ARGV: field, state, who. The time is the server's, so every daemon
# and operator compares it with the same clock.
_SET = Lua("""
local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({state = ARGV[2], by = ARGV[3], at = at}))
return at
""")

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


def set_state(client: redis.Redis, field: str, state: str, by: str) -> int:
    """Set the desired state kept in `field` of DESIRED_KEY (a flow's, or a source's:
    flowd.sync.state.desired_field); the Redis time it was asked at."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}: one of {', '.join(STATES)}")
    return int(_SET(client, [DESIRED_KEY], [field, state, by]))


def set_desired(client: redis.Redis, flow: FlowConfig, state: str, by: str) -> int:
    """Ask every daemon running `flow` to follow `state`; the Redis time it was asked at."""
    return set_state(client, field_of(flow), state, by)


def read_desired(client: redis.Redis, flows: Sequence[FlowConfig]) -> dict[str, Desired]:
    """Each flow's desired state, by flow name (a hand-edited value reads as running)."""
    if not flows:
        return {}
    values = client.hmget(DESIRED_KEY, [field_of(flow) for flow in flows])
    return {flow.name: parse(value) or Desired() for flow, value in
            zip(flows, values, strict=True)}
