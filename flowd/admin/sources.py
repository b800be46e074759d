"""The `[[source]]`s and `[[move]]`s as an operator steers them, from Redis alone: `flowd
pause|resume|drain --source|--move` and the console's buttons. (What they show:
flowd.admin.scheduled_status.)

What this module guarantees:
- A desired state is set in the field `KIND:NAME` of DESIRED_KEY (a source's on the Redis of
  its streams, a move's on the unnamed [redis]), in flowd.core.states' format: every daemon
  running it follows it (flowd.sync.runner).
- `unsettled` says, from Redis alone, why a change is not yet in effect: paused, while a run
  holds the lease; drained, while a run holds it or a run in hand when it was asked has not
  finished its work (a source: caught up; a move: every old partition moved or stuck);
  resumed, never.

Written around `Scheduled` (a kind, a name and its keys): a source and a move differ only
in their `scheduled_*` maker.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from flowd.core import states
from flowd.core.config import Config, MoveConfig, SourceConfig
from flowd.sync.state import desired_field, lease_key, move_state_key, state_key

__all__ = ["Scheduled", "scheduled_move", "scheduled_named", "scheduled_source",
           "set_scheduled_state", "unsettled"]


@dataclass(frozen=True, slots=True)
class Scheduled:
    """Something run on a schedule that an operator steers: where its keys are."""

    kind: str  # "source" or "move"
    name: str
    redis_server: str  # the Redis holding its state, lease and desired state
    field: str  # its field of DESIRED_KEY
    lease: str  # present while a run is in hand
    key: str  # its state hash


def scheduled_source(source: SourceConfig) -> Scheduled:
    return Scheduled("source", source.name, source.redis_server, desired_field(source),
                     lease_key(source), state_key(source))


def scheduled_move(move: MoveConfig) -> Scheduled:
    key = move_state_key(move)  # on [redis], as its lease (flowd.sync.runner: KEY:lease)
    return Scheduled("move", move.name, "", f"move:{move.name}", f"{key}:lease", key)


def scheduled_named(config: Config, kind: str, name: str) -> Scheduled | None:
    """The source or move (`kind`) called `name` in `config`; None: there is none."""
    if kind == "source":
        found = [scheduled_source(s) for s in config.sources if s.name == name]
    else:
        found = [scheduled_move(m) for m in config.moves if m.name == name]
    return found[0] if found else None


def set_scheduled_state(client: redis.Redis, target: Scheduled, state: str, by: str) -> int:
    """Ask every daemon running `target` to follow `state`; the Redis time it was asked at."""
    return states.set_state(client, target.field, state, by)


def unsettled(client: redis.Redis, target: Scheduled, state: str, at_ms: int) -> str | None:
    """Why the change to `state` asked at `at_ms` is not in effect yet (None: it is)."""
    if state == states.RUNNING:
        return None
    holder = client.get(target.lease)
    if holder is not None:
        name = holder.decode() if isinstance(holder, bytes) else str(holder)
        return f"a run is in hand on {name}"
    if state == states.PAUSED:
        return None
    caught_up, last_end, outcome = client.hmget(target.key,
                                                ["caught_up_ms", "last_end_ms", "last_outcome"])
    if int(caught_up or 0) >= at_ms:
        return None  # the run in hand found no more rows after it was asked
    if int(last_end or 0) <= at_ms and outcome not in (b"running", "running"):
        return None  # no run was in hand when it was asked, nor since
    return "no run has caught up since it was asked"
