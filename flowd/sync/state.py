"""A source's state in Redis: one hash per source on the Redis of its streams, beside them
(flowd.core.keys.source_key), read by `flowd status`, the console and the metrics without a
daemon.

Fields: `version` and `cursor` (moved only by flowd.sync.advance, with the rows), `rows`
(rows the cursor has passed), `written` (entries added; fewer when `when` routes a row
nowhere), `committed_ms`; and the last run as the runner records it: `last_start_ms`,
`last_end_ms`, `last_outcome` (running, ok, failed, stopped), `last_error`, `last_rows`,
`caught_up_ms` (when a run last found no row after the cursor: every row inserted before
then, in cursor order, is in the streams), `next_ms`, `held` (why it waits: an output at
its max_len). Its lease (`KEY:lease`) says which daemon runs it now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from flowd.core.config import SourceConfig
from flowd.core.keys import DESIRED_KEY, source_key
from flowd.core.lua import Lua
from flowd.core.replies import text
from flowd.core.states import Desired, parse
from flowd.sync.cursor import decode

__all__ = ["LEASE", "RELEASE", "SourceState", "desired_field", "lease_key", "read_state",
           "state_key"]

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
