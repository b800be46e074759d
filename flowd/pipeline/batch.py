"""The batch: one object carried through decode → handle → route → prepare → write →
commit, each stage filling in its part. Nothing about a batch travels beside it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flowd.clickhouse.prepare import Prepared
from flowd.core.columns import Columns
from flowd.core.replies import Entry
from flowd.delivery.ledger import Prior
from flowd.pipeline.fate import Fates
from flowd.pipeline.route import Routed
from flowd.plugin.decode import Decoded
from flowd.source.reader import Delivery

__all__ = ["Batch", "WriteResult"]


@dataclass(slots=True)
class WriteResult:
    """What the write stage did: the ledger token of its inserts, and the row counts."""

    token: str = ""
    prior: Prior = field(default_factory=Prior)
    rows: int = 0
    deduplicated: int = 0  # rows an earlier delivery had already written
    streamed: int = 0  # rows added to stream outputs on other Redis servers


@dataclass(slots=True)
class Batch:
    delivery: Delivery  # as read
    refused: str | None = None  # every entry is dead-lettered with this reason (bisect)
    started: float = field(default_factory=time.monotonic)
    # -- admit: the entries still this consumer's, and their delivery counts (replays)
    entries: list[Entry] = field(default_factory=list)
    deliveries: dict[str, int] = field(default_factory=dict)
    owned_at: float = 0.0  # (monotonic) when the entries were last known to be ours
    # -- decode, handle, route, prepare
    decoded: Decoded = field(default_factory=lambda: Decoded([]))
    fates: Fates = field(default_factory=Fates)
    rows: Columns = field(default_factory=lambda: Columns([]))  # the handler's records
    routed: Routed = field(default_factory=Routed)
    prepared: list[Prepared] = field(default_factory=list)  # one per routed table
    # -- write, commit
    written: WriteResult = field(default_factory=WriteResult)
    acked: int = 0
    streamed: int = 0  # rows added to stream outputs on the flow's own Redis
    dead_lettered: bool = False  # the rejected entries went to the dead-letter stream
    marks: dict[str, float] = field(default_factory=dict)  # stage → milliseconds

    @property
    def token(self) -> str:
        return self.written.token

    def mark(self, stage: str, since: float) -> float:
        now = time.monotonic()
        self.marks[stage] = (now - since) * 1000
        return now
