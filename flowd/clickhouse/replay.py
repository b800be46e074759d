"""Replay: the one place that decides, from the ledger, what a replayed batch may skip.

A batch comes back un-acked after a crash, a lost answer or a claim. For each table, the
ledger (ledger.py) says of each of its entries: certainly written (an earlier delivery's
insert was confirmed: skip its rows), maybe written (an insert began, its answer never
came), or not written (insert). Guarantees:
- a certainly-written row is never inserted again;
- a maybe-written row is looked for, by the output's `key`, on every server its earlier
  insert was recorded as sent to, after any still-running insert of that delivery ended,
  and inserted only when it is not there; a server that does not answer holds the batch
  (HostUnavailable) rather than letting the row be written elsewhere;
- without a `key` a maybe-written row is inserted again: on a server that deduplicates by
  insert_deduplication_token (guarantee.py) under the token of its first delivery, so the
  server drops it if that insert landed (`origin_parts`); elsewhere at-least-once, with a
  warning naming the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import structlog
from clickhouse_driver import errors as ch_errors

from flowd.clickhouse.guarantee import dedup_token
from flowd.clickhouse.prepare import Block
from flowd.clickhouse.schema import as_text
from flowd.core.config import EVERY_COLUMN
from flowd.core.errors import HostUnavailable
from flowd.delivery.ledger import Prior

__all__ = ["Servers", "WritePlan", "drop_existing", "first_token", "leave_out_known",
           "origin_parts", "plan_for"]

log = structlog.get_logger(__name__)


class Servers(Protocol):
    """What looking for an earlier delivery's rows needs of the writer that replays it
    (writer.ClickHouseWriter): a client for one server, to wait there for that delivery's
    inserts still running, and to ask which of the rows' keys a table holds."""

    def client_for(self, host: str | None) -> Any: ...

    def wait_for_inserts(self, tokens: set[str], client: Any) -> None: ...

    def existing_keys(self, table: str, key: tuple[str, ...], keys: set[tuple[Any, ...]],
                      client: Any) -> set[tuple[Any, ...]]: ...


@dataclass(frozen=True, slots=True)
class WritePlan:
    """How to write one batch's prepared rows into one table."""

    token: str  # the batch's ledger token; every query id starts with it
    exclude: frozenset[str] = frozenset()  # rejected or held entries: write nothing
    written: frozenset[str] = frozenset()  # an earlier delivery certainly wrote these
    maybe_written: dict[str, list[str]] = field(default_factory=dict)  # id → earlier tokens
    key: tuple[str, ...] = ()  # columns identifying a row, for the existence check
    send_by: float | None = None  # monotonic deadline: past it, ownership is not certain
    # With alt_hosts: earlier tokens → the servers their insert was sent to (see ledger.SENT),
    # and the callback that records a server before this token's insert is sent to it.
    sent_to: dict[str, frozenset[str]] = field(default_factory=dict)
    note_host: Callable[[str], None] | None = None
    # Without a key, deduplicated by token: each maybe-written id → the token its rows were
    # first inserted under (its earliest), and those of these tokens whose entries are not
    # all in this delivery (their rows cannot be sent again as first sent).
    origins: dict[str, str] = field(default_factory=dict)
    incomplete: frozenset[str] = frozenset()


def plan_for(table: str, key: tuple[str, ...], *, token: str, exclude: frozenset[str],
             prior: Prior, send_by: float,
             note_host: Callable[[str], None] | None,
             writing: frozenset[str] = frozenset()) -> WritePlan:
    """What this delivery may skip in `table`, from what the ledger knows (`prior`);
    `writing`: the entries this delivery writes."""
    maybe = prior.maybe_written(table)
    origins = {} if key else {entry_id: first_token(tokens)
                              for entry_id, tokens in maybe.items()}
    incomplete = frozenset(origin for origin in set(origins.values())
                           if not prior.tokens.get(origin, frozenset()) <= writing)
    return WritePlan(token=token, exclude=exclude, written=frozenset(prior.written(table)),
                     maybe_written=maybe, key=key, send_by=send_by,
                     sent_to=prior.sent_to(table), note_host=note_host, origins=origins,
                     incomplete=incomplete)


def token_ms(token: str) -> int:
    """The wall-clock milliseconds a ledger token ("consumer/first id/ms") was made at."""
    ms = token.rsplit("/", 1)[-1]
    return int(ms) if ms.isdigit() else 0


def first_token(tokens: list[str]) -> str:
    """The earliest of an entry's ledger tokens: the delivery that first inserted its rows.
    A replay's token is always made later than the tokens it replays (write.py), so every
    replay of an entry picks the same one."""
    return min(tokens, key=lambda token: (token_ms(token), token))


def origin_parts(block: Block, plan: WritePlan, table: str,
                 names: tuple[str, ...]) -> list[tuple[Block, str]]:
    """A block split by the delivery that first inserted each row's entry, with each
    part's insert_deduplication_token: a part sent again as first sent gets the token it was
    first sent with, and the server drops it if that insert landed. A part of a token only
    partly here gets a token of its own (its rows are at-least-once): said in the log."""
    rows: dict[str, list[int]] = {}
    for i, source in enumerate(block.sources):
        rows.setdefault(plan.origins.get(source or "", plan.token), []).append(i)
    parts: list[tuple[Block, str]] = []
    for origin, keep in rows.items():
        part = block if len(keep) == len(block.sources) else block.take(keep)
        if origin in plan.incomplete:
            log.warning("replayed rows may be duplicated: their first delivery's entries "
                        "are not all in this one (split, claimed or dead-lettered meanwhile)",
                        table=table, rows=len(keep), first_token=origin)
        parts.append((part, dedup_token(origin, table, names,
                                        (source or "" for source in part.sources))))
    return parts


def leave_out_known(block: Block, plan: WritePlan) -> tuple[Block, int]:
    """The block without excluded rows and rows certainly written before; how many of
    the latter there were."""
    if not plan.exclude and not plan.written:
        return block, 0
    keep: list[int] = []
    known = 0
    for i, source in enumerate(block.sources):
        if source in plan.exclude:
            continue
        if source in plan.written:
            known += 1
            continue
        keep.append(i)
    return (block.take(keep) if len(keep) < len(block.sources) else block), known


def drop_existing(writer: Servers, table: str, names: tuple[str, ...], block: Block,
                  plan: WritePlan) -> tuple[Block, int]:
    """Leave out rows of maybe-written entries whose key the table already has (runs in
    the writer's thread)."""
    maybe = plan.maybe_written
    suspects = [i for i, source in enumerate(block.sources) if source in maybe]
    if not suspects:
        return block, 0
    key = _every_column(names, block, suspects) if plan.key == EVERY_COLUMN else plan.key
    if not key or not set(key) <= set(names):
        log.warning("replayed rows may be duplicated: no key to check them by",
                    table=table, rows=len(suspects),
                    hint="set `key = [...]` on this [[flow.to]] for exactly-once")
        return block, 0
    # As the server answers them: text, not the bytes a String column was sent as.
    key_columns = [as_text(block.columns[names.index(column)]) for column in key]

    def key_of(i: int) -> tuple[Any, ...]:
        return tuple(column[i] for column in key_columns)

    keys = {key_of(i) for i in suspects}
    existing: set[tuple[Any, ...]] = set()
    for host, tokens in _places(plan, {token for i in suspects
                                       for token in maybe[block.sources[i]]}).items():
        try:
            client = writer.client_for(host)
            writer.wait_for_inserts(tokens, client)
            existing |= writer.existing_keys(table, key, keys, client)
        except ch_errors.NetworkError as exc:
            if host is None:
                raise
            raise HostUnavailable(
                f"an earlier insert into {table} may have landed on {host}, which does "
                f"not answer ({exc}); its rows stay pending until it does") from exc
    keep = [i for i, source in enumerate(block.sources)
            if source not in maybe or key_of(i) not in existing]
    return block.take(keep), len(block.sources) - len(keep)


def _every_column(names: tuple[str, ...], block: Block, rows: list[int]) -> tuple[str, ...]:
    """EVERY_COLUMN: the columns whose values in `rows` an IN can match exactly — no NULL
    (it matches nothing), no Decimal or float (sent as a Float64 literal, which an older
    server refuses to compare with a Decimal column, and which may not round-trip)."""
    return tuple(name for name, column in zip(names, block.columns, strict=True)
                 if all(column[i] is not None and not isinstance(column[i], Decimal | float)
                        for i in rows))


def _places(plan: WritePlan, tokens: set[str]) -> dict[str | None, set[str]]:
    """Where to look for each earlier token's rows. Independent servers (alt_hosts) do not
    see each other's rows: every server an earlier insert was recorded as sent to; without
    a record (a single server, or never sent), the server connected now (None)."""
    places: dict[str | None, set[str]] = {}
    for token in tokens:
        for host in plan.sent_to.get(token) or (None,):
            places.setdefault(host, set()).add(token)
    return places
