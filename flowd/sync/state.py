"""A source's and a move's state in Redis, read by `flowd status`, the console and the
metrics without a daemon.

A source's: one hash per source on the Redis of its streams, beside them
(flowd.core.keys.source_key).

Fields: `version` and `cursor` (moved only by flowd.sync.advance, with the rows), `rows`
(rows the cursor has passed), `written` (entries added; fewer when `when` routes a row
nowhere), `committed_ms`; and the last run as the runner records it: `last_start_ms`,
`last_end_ms`, `last_outcome` (running, ok, failed, stopped), `last_error`, `last_rows`,
`caught_up_ms` (when a run last found no row after the cursor: every row inserted before
then, in cursor order, is in the streams), `next_ms`, `held` (why it waits: an output at
its max_len). Its lease (`KEY:lease`) says which daemon runs it now.

A move's (flowd.core.keys.move_key, on [redis]): the same run fields, `partitions_moved`
and `rows_moved`; the set `KEY:active` of partitions begun and not done; and per partition
the hash `KEY:part:ID` (flowd.sync.move: `phase`, `attempts`, `cursor`, `snapshot`, `error`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from flowd.core.config import MoveConfig, SourceConfig
from flowd.core.keys import DESIRED_KEY, move_key, source_key
from flowd.core.lua import Lua
from flowd.core.replies import text
from flowd.core.states import Desired, parse
from flowd.sync.cursor import decode

__all__ = ["LEASE", "RELEASE", "MoveState", "PartitionState", "SourceState", "desired_field",
           "lease_key", "move_state_key", "read_move_state", "read_state", "state_key"]

# KEYS[1]: the lease; ARGV: the owner, its time to live (ms), a holder known dead ("" for
# none). Taken when free (or held by that dead one), renewed when ours: 1; else its holder.
LEASE = Lua("""
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] and owner ~= ARGV[3] then return owner end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")
RELEASE = Lua("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


def state_key(source: SourceConfig) -> str:
    return source_key(source.name, source.to[0].stream)


def lease_key(source: SourceConfig) -> str:
    return f"{state_key(source)}:lease"


def desired_field(source: SourceConfig) -> str:
    """Its field in the desired-state hash (flowd.core.states) of its Redis."""
    return f"source:{source.name}"


@dataclass(frozen=True, slots=True)
class SourceState:
    name: str
    desired: Desired
    cursor: tuple[Any, ...] | None
    rows: int
    written: int
    committed_ms: int
    last_start_ms: int
    last_end_ms: int
    last_outcome: str
    last_error: str
    last_rows: int
    caught_up_ms: int
    next_ms: int
    held: str
    running_on: str  # the daemon holding the lease, "" when none

    def lag_s(self, now_ms: int) -> float | None:
        """Seconds since a run last found nothing after the cursor (None: never)."""
        return max(0.0, (now_ms - self.caught_up_ms) / 1000) if self.caught_up_ms else None

    def as_dict(self, now_ms: int) -> dict[str, Any]:
        return {"source": self.name, "state": self.desired.state,
                "cursor": [str(v) for v in self.cursor] if self.cursor else None,
                "lag_s": self.lag_s(now_ms), "rows": self.rows, "written": self.written,
                "last_run": {"start_ms": self.last_start_ms or None,
                             "end_ms": self.last_end_ms or None,
                             "outcome": self.last_outcome or None,
                             "error": self.last_error or None, "rows": self.last_rows},
                "next_ms": self.next_ms or None, "held": self.held or None,
                "running_on": self.running_on or None}


_FIELDS = ("cursor", "rows", "written", "committed_ms", "last_start_ms", "last_end_ms",
           "last_outcome", "last_error", "last_rows", "caught_up_ms", "next_ms", "held")


def read_state(client: redis.Redis, source: SourceConfig) -> SourceState:
    values = dict(zip(_FIELDS, client.hmget(state_key(source), _FIELDS), strict=True))
    desired = parse(client.hget(DESIRED_KEY, desired_field(source))) or Desired()
    owner = client.get(lease_key(source))

    def number(name: str) -> int:
        return int(values[name] or 0)

    return SourceState(
        name=source.name, desired=desired, cursor=decode(values["cursor"]),
        rows=number("rows"), written=number("written"), committed_ms=number("committed_ms"),
        last_start_ms=number("last_start_ms"), last_end_ms=number("last_end_ms"),
        last_outcome=text(values["last_outcome"] or b""),
        last_error=text(values["last_error"] or b""), last_rows=number("last_rows"),
        caught_up_ms=number("caught_up_ms"), next_ms=number("next_ms"),
        held=text(values["held"] or b""), running_on=text(owner or b""))


@dataclass(frozen=True, slots=True)
class PartitionState:
    """One partition of a move in hand (flowd.sync.move's phases), or stuck."""

    partition: str
    phase: str
    attempts: int
    sent: int  # rows of its snapshot written into the via stream so far
    rows: int  # rows of its snapshot
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {"partition": self.partition, "phase": self.phase, "attempts": self.attempts,
                "sent": self.sent, "rows": self.rows, "error": self.error or None}


@dataclass(frozen=True, slots=True)
class MoveState:
    name: str
    desired: Desired
    partitions_moved: int  # moved, verified on both servers and dropped from the hot one
    rows_moved: int
    last_start_ms: int
    last_end_ms: int
    last_outcome: str
    last_error: str
    next_ms: int
    running_on: str
    in_hand: tuple[PartitionState, ...]  # partitions begun and not done (stuck ones too)

    @property
    def stuck(self) -> tuple[PartitionState, ...]:
        return tuple(p for p in self.in_hand if p.phase == "stuck")

    def as_dict(self) -> dict[str, Any]:
        return {"move": self.name, "state": self.desired.state,
                "partitions_moved": self.partitions_moved, "rows_moved": self.rows_moved,
                "last_run": {"start_ms": self.last_start_ms or None,
                             "end_ms": self.last_end_ms or None,
                             "outcome": self.last_outcome or None,
                             "error": self.last_error or None},
                "next_ms": self.next_ms or None, "running_on": self.running_on or None,
                "partitions": [p.as_dict() for p in self.in_hand]}


def move_state_key(move: MoveConfig) -> str:
    return move_key(move.name, move.via)


def read_move_state(client: redis.Redis, move: MoveConfig) -> MoveState:
    key = move_state_key(move)
    fields = ("partitions_moved", "rows_moved", "last_start_ms", "last_end_ms",
              "last_outcome", "last_error", "next_ms")
    values = dict(zip(fields, client.hmget(key, fields), strict=True))
    desired = parse(client.hget(DESIRED_KEY, f"move:{move.name}")) or Desired()
    in_hand = []
    for partition in sorted(text(p) for p in client.smembers(f"{key}:active")):
        phase, attempts, cursor, snapshot, error = client.hmget(
            f"{key}:part:{partition}", ["phase", "attempts", "cursor", "snapshot", "error"])
        rows = int(text(snapshot).partition(":")[0] or 0) if snapshot else 0
        in_hand.append(PartitionState(partition, text(phase or b"new"), int(attempts or 0),
                                      int(cursor or 0), rows, text(error or b"")))

    def number(name: str) -> int:
        return int(values[name] or 0)

    return MoveState(
        name=move.name, desired=desired, partitions_moved=number("partitions_moved"),
        rows_moved=number("rows_moved"), last_start_ms=number("last_start_ms"),
        last_end_ms=number("last_end_ms"), last_outcome=text(values["last_outcome"] or b""),
        last_error=text(values["last_error"] or b""), next_ms=number("next_ms"),
        running_on=text(client.get(f"{key}:lease") or b""), in_hand=tuple(in_hand))
