"""When a source or move runs next: every N seconds, or at a cron expression's times.

Guarantees: a schedule is computed from the start of the last run, kept in Redis (not from
this process's start), so a restart neither runs a source again early nor forgets one that
was due: a run missed while no daemon ran happens once, at once, not once per missed time.
Cron times are the host's local time, as cron's; `croniter` parses and steps them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from croniter import croniter

__all__ = ["Schedule"]


@dataclass(frozen=True, slots=True)
class Schedule:
    every: float | None = None  # seconds
    cron: str | None = None

    def next_run(self, last_start: float | None, now: float) -> float:
        """When the next run is due (a Unix time; at most `now` when it is due already)."""
        if self.every is not None:
            return now if last_start is None else last_start + self.every
        after = now if last_start is None else last_start
        start = dt.datetime.fromtimestamp(after).astimezone()
        return float(croniter(self.cron, start).get_next(float))

    def describe(self) -> str:
        if self.every is not None:
            return f"every {self.every:g}s"
        return f"cron {self.cron}"
