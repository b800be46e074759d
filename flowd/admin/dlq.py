"""`flowd dlq list|replay|purge`: look at a flow's dead letters, send them back, or drop them.

A dead letter is the original entry's fields, byte for byte, plus the `_flowd_*` fields the
consumer adds (see FlowConsumer._dead_letter). Replay strips those and XADDs the original
fields to the flow's source stream, and XDELs the dead letter in the same MULTI/EXEC, under
WATCH: a dead letter is moved exactly once even if two operators replay at the same time,
and nothing is lost if the command dies half-way (each chunk moved, or not at all).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import orjson
import redis
import structlog

from flowd.admin.status import talking_to
from flowd.core.config import Config, FlowConfig
from flowd.core.errors import ConfigError
from flowd.source.group import stream_order

__all__ = ["CHUNK", "DeadLetter", "dead_letters", "flow_with_dead_letter", "purge", "replay",
           "run"]

log = structlog.get_logger(__name__)

CHUNK = 200  # dead letters moved per MULTI/EXEC
_WATCH_TRIES = 50  # a busy dead-letter stream (a daemon adding to it) aborts EXEC; try again
META_PREFIX = b"_flowd_"
_ID = re.compile(r"\d+-\d+")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    fields: dict[bytes, bytes]  # as stored, _flowd_* included

    def _meta(self, name: str) -> str | None:
        value = self.fields.get(META_PREFIX + name.encode())
        return None if value is None else value.decode(errors="backslashreplace")

    @property
    def flow(self) -> str | None:
        return self._meta("flow")

    @property
    def source_id(self) -> str | None:
        return self._meta("id")

    @property
    def reason(self) -> str | None:
        return self._meta("reason")

    @property
    def deliveries(self) -> int | None:
        value = self._meta("deliveries")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def original(self) -> dict[bytes, bytes]:
        """The entry as it was in the source stream."""
        return {k: v for k, v in self.fields.items() if not k.startswith(META_PREFIX)}

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id, "source_id": self.source_id, "flow": self.flow,
            "deliveries": self.deliveries, "reason": self.reason,
            "fields": {_show(k): _show(v) for k, v in self.original.items()},
        }


def _show(value: bytes) -> str:
    return value.decode(errors="backslashreplace")


def flow_with_dead_letter(config: Config, name: str) -> FlowConfig:
    try:
        flow = config.flow(name)
    except KeyError:
        known = ", ".join(f.name for f in config.flows) or "none"
        raise ConfigError(config.path, f"no such flow in this file (flows: {known})",
                          flow=name) from None
    if not flow.dead_letter:
        raise ConfigError(config.path, "this flow has no dead-letter stream: its rejected "
                          "entries stay pending in the group, not in a dead-letter stream",
                          flow=name, key="dead_letter")
    return flow


def _belongs(letter: DeadLetter, flow: FlowConfig) -> bool:
    # Several flows may share a dead-letter stream; each one's letters are its own.
    return letter.flow is None or letter.flow == flow.name


def dead_letters(client: redis.Redis, flow: FlowConfig, *,
                 ids: Sequence[str] = ()) -> Iterator[DeadLetter]:
    """The flow's dead letters, oldest first (only `ids`, when given, in stream order)."""
    assert flow.dead_letter
    if ids:
        for entry_id in sorted(set(ids), key=stream_order):
            for raw_id, fields in client.xrange(flow.dead_letter, entry_id, entry_id):
                letter = DeadLetter(_show(raw_id), dict(fields))
                if _belongs(letter, flow):
                    yield letter
        return
    start = "-"
    while True:
        page = client.xrange(flow.dead_letter, min=start, count=CHUNK)
        for raw_id, fields in page:
            letter = DeadLetter(_show(raw_id), dict(fields))
            if _belongs(letter, flow):
                yield letter
        if len(page) < CHUNK:
            return
        start = f"({_show(page[-1][0])}"


def _chunks(letters: Iterator[DeadLetter]) -> Iterator[list[DeadLetter]]:
    chunk: list[DeadLetter] = []
    for letter in letters:
        chunk.append(letter)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _move(client: redis.Redis, flow: FlowConfig, chunk: list[DeadLetter], *,
          to_source: bool) -> int:
    """XADD (replay) and XDEL one chunk atomically; returns how many were moved.

    WATCH makes the check-then-act safe: letters another replay or purge took meanwhile
    are re-read as gone, and skipped rather than re-added.
    """
    assert flow.dead_letter
    for _ in range(_WATCH_TRIES):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(flow.dead_letter)
                present = [letter for letter in chunk
                           if pipe.xrange(flow.dead_letter, letter.id, letter.id)]
                if not present:
                    pipe.unwatch()
                    return 0
                pipe.multi()
                if to_source:
                    for letter in present:
                        pipe.xadd(flow.stream, letter.original)
                pipe.xdel(flow.dead_letter, *(letter.id for letter in present))
                replies = pipe.execute()
            except redis.WatchError:
                continue
        deleted = replies[-1]
        if deleted != len(present):  # impossible under WATCH; say so loudly if it happens
            raise RuntimeError(f"{flow.dead_letter}: deleted {deleted} of {len(present)} "
                               "dead letters in one transaction")
        return deleted
    raise RuntimeError(f"{flow.dead_letter}: the stream kept changing; gave up after "
                       f"{_WATCH_TRIES} tries (is something writing to it very fast?)")


def replay(client: redis.Redis, flow: FlowConfig, *, ids: Sequence[str] = ()) -> int:
    """Move the flow's dead letters (or those `ids`) back to its source stream."""
    # Collect first: the letters are moved to the source, and a flow whose dead-letter
    # stream is also its source would otherwise chase its own tail.
    # A letter with no original fields (its entry was deleted while pending) has nothing to
    # send back: it stays, for purge.
    letters = [letter for letter in dead_letters(client, flow, ids=ids) if letter.original]
    return sum(_move(client, flow, chunk, to_source=True) for chunk in _chunks(iter(letters)))


def purge(client: redis.Redis, flow: FlowConfig, *, ids: Sequence[str] = ()) -> int:
    letters = list(dead_letters(client, flow, ids=ids))
    return sum(_move(client, flow, chunk, to_source=False) for chunk in _chunks(iter(letters)))


def _missing(client: redis.Redis, flow: FlowConfig, ids: Sequence[str]) -> list[str]:
    found = {letter.id for letter in dead_letters(client, flow, ids=ids)}
    return [i for i in dict.fromkeys(ids) if i not in found]


def _print_letters(letters: list[DeadLetter], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps([letter.as_dict() for letter in letters],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for letter in letters:
        deliveries = "?" if letter.deliveries is None else letter.deliveries
        print(f"{letter.id}  source {letter.source_id}  deliveries {deliveries}  "
              f"reason: {letter.reason}")
        for key, value in letter.original.items():
            shown = _show(value)
            if len(shown) > 200:
                shown = f"{shown[:200]}… ({len(value)} bytes)"
            print(f"    {_show(key)} = {shown}")


def _list(client: redis.Redis, flow: FlowConfig, ids: Sequence[str], count: int | None,
          yes: bool, as_json: bool) -> int:
    letters = []
    for letter in dead_letters(client, flow, ids=ids):
        if count is not None and len(letters) >= count:
            break
        letters.append(letter)
    _print_letters(letters, as_json)
    if not as_json:
        total = sum(1 for _ in dead_letters(client, flow)) if count else len(letters)
        print(f"{len(letters)} of {total} dead letter(s) of flow {flow.name} in "
              f"{flow.dead_letter}", file=sys.stderr)
    return 0


def _replay(client: redis.Redis, flow: FlowConfig, ids: Sequence[str], count: int | None,
            yes: bool, as_json: bool) -> int:
    moved = replay(client, flow, ids=ids)
    print(f"replayed {moved} dead letter(s) from {flow.dead_letter} to {flow.stream}")
    if empty := sum(1 for letter in dead_letters(client, flow, ids=ids)
                    if not letter.original):
        print(f"flowd: {empty} dead letter(s) kept: no original fields to replay "
              "(the entry was deleted before flowd read it); purge them with --yes",
              file=sys.stderr)
    return 0


def _purge(client: redis.Redis, flow: FlowConfig, ids: Sequence[str], count: int | None,
           yes: bool, as_json: bool) -> int:
    if not yes:
        letters = list(dead_letters(client, flow, ids=ids))
        for letter in letters:
            print(f"{letter.id}  source {letter.source_id}  reason: {letter.reason}")
        print(f"would delete {len(letters)} dead letter(s) from {flow.dead_letter}; "
              "run again with --yes to delete them", file=sys.stderr)
        return 1
    deleted = purge(client, flow, ids=ids)
    print(f"deleted {deleted} dead letter(s) from {flow.dead_letter}")
    return 0


# Each action of `flowd dlq`, given (client, flow, ids, count, yes, as_json); its exit code.
_ACTIONS = {"list": _list, "replay": _replay, "purge": _purge}


def run(config: Config, client: redis.Redis, *, action: str, flow_name: str,
        ids: Sequence[str] = (), count: int | None = None, yes: bool = False,
        as_json: bool = False) -> int:
    """The `flowd dlq` command; returns the exit code."""
    flow = flow_with_dead_letter(config, flow_name)
    if bad := [i for i in ids if not _ID.fullmatch(i)]:
        print(f"flowd: {', '.join(bad)}: not a stream id (like 1700000000000-0)",
              file=sys.stderr)
        client.close()
        return 2
    if action not in _ACTIONS:  # argparse keeps this out; a caller of run() might not
        client.close()
        raise ValueError(f"unknown dlq action {action!r}")
    with talking_to(config, client, flow.server):
        try:
            if ids and (missing := _missing(client, flow, ids)):
                print(f"flowd: {flow.dead_letter}: no dead letter of flow {flow.name!r} with id "
                      f"{', '.join(missing)}; nothing done", file=sys.stderr)
                return 1
            return _ACTIONS[action](client, flow, ids, count, yes, as_json)
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: the key is not a stream
            print(f'flowd: flow "{flow.name}": {flow.dead_letter} / {flow.stream}: {exc}',
                  file=sys.stderr)
            return 1
