"""An entry's fate: the one place that decides what becomes of each entry a batch read.

Every entry read ends in exactly one of four places:
- **written**: its rows go to every output its handler routed them to, then it is acked
  (and deleted, with `delete_acked`);
- **dead-lettered**: acked, with a dead letter carrying its fields as read and the reason —
  too large or not UTF-8 (found by flowd.plugin.decode), deleted from the stream while
  pending, delivered more than `max_deliveries` times, refused by its handler (a
  Rejection) or by a table (a value a column cannot take), or the one entry a batch's write
  was refused for (found by `bisect`). A flow without a `dead_letter` stream keeps such
  entries pending instead: nothing is dropped unrecorded;
- **held**: its handler raised on it (found by `bisect`); it stays pending and is read
  again after a back-off, until `max_deliveries` gives up on it;
- **left**: another consumer claimed it meanwhile; what becomes of it is that consumer's
  business, so this batch neither writes, acks nor dead-letters it.
The first reason found for an entry is the one its dead letter carries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TypeVar

from flowd.clickhouse.prepare import Prepared
from flowd.core.columns import Columns
from flowd.core.config import FlowConfig
from flowd.core.replies import Entry
from flowd.delivery.commit import CommitPlan

__all__ = ["VANISHED", "Fates", "bisect", "handler_raised", "refused"]

VANISHED = "deleted from the stream while pending"

T = TypeVar("T")
R = TypeVar("R")


def refused(exc: BaseException) -> str:
    """The reason of the one entry a write was refused for."""
    return f"refused: {exc!r}"


def handler_raised(handler: str, exc: BaseException) -> str:
    """The reason an entry is held (and, past max_deliveries, its dead letter's)."""
    return f"handler {handler!r} raised {exc!r}"


@dataclass(slots=True)
class Fates:
    """What becomes of the entries of one batch that are not simply written."""

    rejected: dict[str, str] = field(default_factory=dict)  # → dead letter, with the reason
    held: dict[str, str] = field(default_factory=dict)  # → pending, read again later
    vanished: int = 0  # of `rejected`: deleted from the stream while pending

    # -- decided before the handler ----------------------------------------------------
    def refuse(self, ids: Iterable[str], reason: str) -> None:
        self.rejected.update((entry_id, reason) for entry_id in ids)

    def vanish(self, ids: Iterable[str]) -> None:
        """Deleted while pending: nothing left to write; the dead letter keeps the trace."""
        for entry_id in ids:
            self.rejected[entry_id] = VANISHED
            self.vanished += 1

    def give_up(self, deliveries: Mapping[str, int], flow: FlowConfig,
                last_errors: Mapping[str, str]) -> set[str]:
        """Entries delivered more than `max_deliveries` times: dead-lettered before the
        handler sees them again, with the last error this process saw."""
        exhausted = {i for i, n in deliveries.items() if n > flow.max_deliveries}
        for entry_id in exhausted:
            self.rejected[entry_id] = (
                f"delivered {deliveries[entry_id]} times (max_deliveries "
                f"{flow.max_deliveries}); last error: "
                f"{last_errors.get(entry_id, 'not known to this process')}")
        return exhausted

    # -- decided by the handler and the tables -----------------------------------------
    def handled(self, rejections: Iterable[tuple[str, str]], held: Mapping[str, str]) -> None:
        for source, reason in rejections:
            self.rejected.setdefault(source, reason)
        self.held.update(held)

    def tables_refused(self, prepared: Prepared) -> None:
        """A row a table cannot take rejects its entry from every output.

        A row its handler did not attribute to an entry raises ValueError instead: it
        cannot be dead-lettered alone, so the batch fails (and `bisect` finds the entry).
        """
        for source, reason in prepared.rejected:
            if source is None:
                # Failing the batch keeps it pending instead of dropping data.
                raise ValueError(f"{reason} (record not attributed to an entry: use "
                                 "message.emit(...) in the handler to dead-letter it alone)")
            self.rejected.setdefault(source, reason)

    def leave(self, lost: Iterable[str]) -> None:
        """Entries now owned by another consumer: their fate is its business."""
        for entry_id in lost:
            if self.rejected.pop(entry_id, None) == VANISHED:
                self.vanished -= 1
            self.held.pop(entry_id, None)

    @property
    def unwritten(self) -> set[str]:
        """Entries whose rows no output gets."""
        return self.rejected.keys() | self.held.keys()

    # -- what the commit does with them ------------------------------------------------
    def commit_plan(self, flow: FlowConfig, entries: list[Entry],
                    streams: list[tuple[str, Columns]],
                    deliveries: Mapping[str, int]) -> CommitPlan:
        """Every entry acked but those held (and the rejected ones when the flow has no
        dead-letter stream: they stay pending); stream rows of neither; a dead letter per
        rejected entry, with its fields as read and the reason."""
        rejected, held = self.rejected, self.held
        kept_back = held.keys() | (set() if flow.dead_letter else rejected.keys())
        excluded = rejected.keys() | held.keys()
        ids = list(map(itemgetter(0), entries))
        plan = CommitPlan([entry_id for entry_id in ids if entry_id not in kept_back]
                          if kept_back else ids,
                          [(stream, rows.without(excluded)) for stream, rows in streams])
        if flow.dead_letter:
            raw = dict(entries)
            plan.dead_letters = [
                (flow.dead_letter, entry_id, raw.get(entry_id), {
                    "_flowd_reason": reason,
                    "_flowd_flow": flow.name,
                    "_flowd_stream": flow.stream,
                    "_flowd_id": entry_id,
                    "_flowd_deliveries": deliveries.get(entry_id, 1),
                }) for entry_id, reason in rejected.items()]
        return plan


async def bisect(whole: T, size: Callable[[T], int], halves: Callable[[T], tuple[T, T]],
                 attempt: Callable[[T], Awaitable[R]],
                 blame: Callable[[T, Exception], Awaitable[R]],
                 at_fault: Callable[[Exception], bool]) -> list[R]:
    """Run `attempt` on `whole`; when it fails for something its entries are to blame for
    (`at_fault`), run it on each half, first half first, down to single entries, and hand
    a single one that still fails to `blame`. The results, in the entries' order; any
    other failure is raised at once.

    The one split-in-halves of flowd: it finds the entries a handler raises on (held) and
    the entry a write is refused for (dead-lettered), in log2(batch) attempts per entry."""
    try:
        return [await attempt(whole)]
    except Exception as exc:
        if not at_fault(exc):
            raise
        if size(whole) <= 1:
            return [await blame(whole, exc)]
    first, second = halves(whole)
    return [*await bisect(first, size, halves, attempt, blame, at_fault),
            *await bisect(second, size, halves, attempt, blame, at_fault)]
