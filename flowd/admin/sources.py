"""The `[[source]]`s as an operator steers them, from Redis alone: `flowd
pause|resume|drain --source` and the console's buttons. (What they show of a source:
flowd.admin.status.)

What this module guarantees:
- A desired state is set in the source's field of DESIRED_KEY on the Redis of its streams,
  in flowd.core.states' format: every daemon running the source follows it (flowd.sync.source).
- `unsettled` says, from Redis alone, why a change is not yet in effect: paused, while a run
  holds the source's lease; drained, while a run holds it or a run in hand when it was asked
  has not caught up; resumed, never.

Written around `Scheduled` (a kind, a name and its keys), so that a `[[move]]` steered the
same way needs only its own `scheduled_*` maker.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from flowd.core import states
from flowd.core.config import SourceConfig
from flowd.sync.state import desired_field, lease_key, state_key

__all__ = ["Scheduled", "scheduled_source", "set_source_state", "unsettled"]


@dataclass(frozen=True, slots=True)
class Scheduled:
    """Something run on a schedule that an operator steers: where its keys are."""

    kind: str  # "source" (a "move" later)
    name: str
    redis_server: str  # the Redis holding its state, lease and desired state
    field: str  # its field of DESIRED_KEY
    lease: str  # present while a run is in hand
    key: str  # its state hash


def scheduled_source(source: SourceConfig) -> Scheduled:
    return Scheduled("source", source.name, source.redis_server, desired_field(source),
                     lease_key(source), state_key(source))


def set_source_state(client: redis.Redis, target: Scheduled, state: str, by: str) -> int:
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
