"""What becomes of each entry (flowd.pipeline.fate): the one split that finds the entry at
fault, and the rules the commit follows for rejected, held and claimed entries."""

from __future__ import annotations

import asyncio
import math
import textwrap

import pytest

from flowd.core.columns import Columns
from flowd.core.config import FlowConfig
from flowd.core.retry import is_data_error
from flowd.pipeline.fate import VANISHED, Fates, bisect, refused
from flowd.testing import flow_from_toml


def _flow(dead_letter: str | None) -> FlowConfig:
    letter = f'dead_letter = "{dead_letter}"' if dead_letter else ""
    return flow_from_toml(textwrap.dedent(f"""
        [[flow]]
        name = "f"
        stream = "in"
        group = "g"
        handler = "passthrough"
        {letter}
          [[flow.to]]
          stream = "out"
    """))


def _split(items: list[int]) -> tuple[list[int], list[int]]:
    return items[:len(items) // 2], items[len(items) // 2:]


def _run_bisect(items: list[int], bad: set[int]) -> tuple[list[tuple[str, list[int]]], int]:
    attempts = 0

    async def attempt(part: list[int]) -> tuple[str, list[int]]:
        nonlocal attempts
        attempts += 1
        if bad & set(part):
            raise ValueError(f"cannot take {sorted(bad & set(part))}")
        return "written", part

    async def blame(part: list[int], exc: Exception) -> tuple[str, list[int]]:
        return refused(exc), part

    results = asyncio.run(bisect(items, len, _split, attempt, blame, is_data_error))
    return results, attempts


def test_one_bad_entry_among_64_is_found_alone_and_every_other_entry_is_written_in_order(
        ) -> None:
    results, attempts = _run_bisect(list(range(64)), {37})
    blamed = [part for outcome, part in results if outcome != "written"]
    written = [i for outcome, part in results if outcome == "written" for i in part]
    assert blamed == [[37]]
    assert results[[part for _, part in results].index([37])][0] == \
        "refused: ValueError('cannot take [37]')"
    assert written == [i for i in range(64) if i != 37]  # nothing lost, order kept
    assert attempts <= 2 * math.log2(64) + 1  # log2, not one attempt per entry


def test_a_batch_with_no_bad_entry_is_attempted_once_and_never_split() -> None:
    results, attempts = _run_bisect(list(range(10)), set())
    assert results == [("written", list(range(10)))] and attempts == 1


def test_an_outage_is_not_blamed_on_the_entries_it_fails_at_once() -> None:
    calls = []

    async def attempt(part: list[int]) -> None:
        calls.append(part)
        raise ConnectionError("the server went away")

    async def blame(part: list[int], exc: Exception) -> None:
        raise AssertionError("an outage must not dead-letter anything")

    with pytest.raises(ConnectionError):
        asyncio.run(bisect([1, 2, 3, 4], len, _split, attempt, blame, is_data_error))
    assert calls == [[1, 2, 3, 4]]


ENTRIES = [(f"1-{i}", [b"k", str(i).encode()]) for i in range(4)]


def _plan(flow: FlowConfig, fates: Fates):
    rows = Columns([entry_id for entry_id, _ in ENTRIES], {"k": ["0", "1", "2", "3"]})
    return fates.commit_plan(flow, ENTRIES, [("out", rows)], {"1-1": 3})


def test_a_rejected_entry_is_acked_with_a_dead_letter_and_a_held_one_stays_pending() -> None:
    fates = Fates()
    fates.handled([("1-1", "a value the handler refused")], {"1-2": "handler raised"})
    plan = _plan(_flow("dead"), fates)
    assert plan.ack == ["1-0", "1-1", "1-3"]  # 1-2 held: pending, read again later
    (stream, rows), = plan.streams
    assert stream == "out" and rows.ids == ["1-0", "1-3"]  # neither's rows go out
    (letter,) = plan.dead_letters
    assert letter[:3] == ("dead", "1-1", [b"k", b"1"])
    assert letter[3]["_flowd_reason"] == "a value the handler refused"
    assert letter[3]["_flowd_deliveries"] == 3


def test_without_a_dead_letter_stream_a_rejected_entry_stays_pending_not_dropped() -> None:
    fates = Fates()
    fates.vanish(["1-0"])
    fates.handled([("1-1", "refused")], {})
    plan = _plan(_flow(None), fates)
    assert plan.ack == ["1-2", "1-3"] and plan.dead_letters == []


def test_the_first_reason_found_is_the_one_the_dead_letter_carries() -> None:
    fates = Fates()
    fates.handled([("1-1", "the handler's reason")], {})
    fates.handled([("1-1", "a table's later reason")], {})
    assert fates.rejected == {"1-1": "the handler's reason"}


def test_an_entry_another_consumer_claimed_is_neither_acked_written_nor_dead_lettered(
        ) -> None:
    fates = Fates()
    fates.vanish(["1-3"])
    fates.handled([("1-1", "refused")], {"1-2": "raised"})
    fates.leave({"1-1", "1-2", "1-3"})
    assert fates.rejected == {} and fates.held == {} and fates.vanished == 0
    assert VANISHED == "deleted from the stream while pending"


def test_entries_delivered_too_often_are_given_up_on_with_the_last_error() -> None:
    flow = flow_from_toml(textwrap.dedent("""
        [[flow]]
        name = "f"
        stream = "in"
        group = "g"
        handler = "passthrough"
        max_deliveries = 3
          [[flow.to]]
          stream = "out"
    """))
    fates = Fates()
    given_up = fates.give_up({"1-0": 3, "1-1": 4}, flow, {"1-1": "handler raised KeyError"})
    assert given_up == {"1-1"}
    assert fates.rejected == {"1-1": "delivered 4 times (max_deliveries 3); last error: "
                                     "handler raised KeyError"}
