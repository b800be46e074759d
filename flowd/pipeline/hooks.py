"""Stage hooks: one seam where code outside the data path watches a batch go by.

A subscriber implements any of `after_write(batch)` (every output written, before the
commit), `before_done(batch, target)` (one table's insert confirmed, before the ledger marks
it done) and `after_commit(batch)` (the batch acked). Hooks run in the flow's event loop and
must not block or raise: a hook is told, it does not steer. A flow's counters are one
subscriber (flowd.pipeline.stats); tests install others (fault injection) with `install`,
before the daemon starts. With none installed, a hook point costs one loop over the flow's
own subscribers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowd.pipeline.batch import Batch

__all__ = ["StageHooks", "install", "installed"]

_installed: list[Any] = []


def install(subscriber: Any) -> Callable[[], None]:
    """Add a subscriber to every flow started from now on, in this process; the function
    returned removes it."""
    _installed.append(subscriber)
    return lambda: _installed.remove(subscriber)


def installed() -> list[Any]:
    return list(_installed)


class StageHooks:
    """The subscribers of one flow, called at each stage they implement."""

    def __init__(self, subscribers: Iterable[Any]) -> None:
        subscribers = list(subscribers)
        self._after_write = _bound(subscribers, "after_write")
        self._before_done = _bound(subscribers, "before_done")
        self._after_commit = _bound(subscribers, "after_commit")

    def after_write(self, batch: Batch) -> None:
        for hook in self._after_write:
            hook(batch)

    def before_done(self, batch: Batch, target: str) -> None:
        for hook in self._before_done:
            hook(batch, target)

    def after_commit(self, batch: Batch) -> None:
        for hook in self._after_commit:
            hook(batch)


def _bound(subscribers: list[Any], name: str) -> list[Callable[..., None]]:
    return [hook for subscriber in subscribers
            if callable(hook := getattr(subscriber, name, None))]
