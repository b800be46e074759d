"""The built-in handlers, `json_fields` and `passthrough`, run offline with flowd.testing.

Their data path on real servers is in test_consumer.py; these pin down what each handler
makes of an entry, through the same stages, without a server.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import hub_entry

from flowd.testing import Rejected, run_handler

EVENTS = [("rec_id", "UInt64"), ("task_for", "String"), ("function_type", "String"),
          ("a", "Int64"), ("b", "String")]


def json_fields(messages: list[dict[str, Any]], **flow: Any) -> Any:
    return run_handler("json_fields", messages, tables={"events": EVENTS}, flow={
        "dead_letter": "dead", "to": [{"clickhouse": "events"}, {"stream": "out"}], **flow})


# -- json_fields ---------------------------------------------------------------------------
def test_json_fields_merges_the_data_object_into_the_entry_s_fields() -> None:
    result = json_fields([hub_entry(1), hub_entry(2, task_for="nlp")])

    assert result.rows["events"] == [
        {"rec_id": 1, "task_for": "store", "function_type": "demo", "a": 1, "b": "text-1"},
        {"rec_id": 2, "task_for": "nlp", "function_type": "demo", "a": 2, "b": "text-2"}]
    assert result.streams["out"][0] == {**hub_entry(1), "a": "1", "b": "text-1"}
    assert result.dead_letters == [] and result.pending == []
    assert result.ignored_fields == {"events": 2}  # `data` itself, in each row: no column


def test_json_fields_lets_a_key_of_data_win_over_a_field_of_the_same_name() -> None:
    result = json_fields([hub_entry(1, task_for="store", function_type="from-data")])

    assert result.rows["events"][0]["function_type"] == "from-data"


def test_json_fields_objects_with_different_keys_each_keep_their_own() -> None:
    result = run_handler("json_fields", [hub_entry(1), hub_entry(2, c="only here")],
                         flow={"to": [{"stream": "out"}]})

    assert [record.get("c") for record in result.streams["out"]] == [None, "only here"]
    assert [record["a"] for record in result.streams["out"]] == ["1", "2"]


@pytest.mark.parametrize(("data", "reason"), [
    ("[1, 2]", "field 'data' is JSON but not an object (got list)"),
    ('"text"', "field 'data' is JSON but not an object (got str)"),
    ("null", "field 'data' is JSON but not an object (got NoneType)"),
])
def test_json_fields_rejects_data_that_is_not_an_object_and_commits_the_rest(
        data: str, reason: str) -> None:
    bad = {**hub_entry(2), "data": data}
    result = json_fields([hub_entry(1), bad, hub_entry(3)])

    assert result.rejections == [Rejected(1, "1-1", reason, bad)]
    assert result.dead_letters == result.rejections
    assert [row["rec_id"] for row in result.rows["events"]] == [1, 3]
    assert [record["rec_id"] for record in result.streams["out"]] == ["1", "3"]


def test_json_fields_names_where_bad_json_breaks_counting_characters() -> None:
    result = json_fields([{**hub_entry(1), "data": '{"é": 1,}'}])

    [letter] = result.dead_letters
    assert letter.reason.startswith("field 'data' is not valid JSON: ")
    assert letter.reason.endswith("line 1 column 8 (char 7)")  # characters, not bytes


def test_json_fields_passes_an_entry_without_data_on_as_it_is() -> None:
    entry = {"rec_id": "1", "task_for": "store", "function_type": "demo", "a": "4", "b": "x"}
    result = json_fields([entry])

    assert result.rows["events"] == [{**entry, "rec_id": 1, "a": 4}]


def test_json_fields_values_a_column_cannot_take_dead_letter_their_entry_alone() -> None:
    result = json_fields([hub_entry(1), hub_entry(2, a="12"), hub_entry(3, a=1.5),
                          hub_entry(4, a=2**63)])

    assert [row["a"] for row in result.rows["events"]] == [1, 12]
    assert [(letter.index, letter.reason) for letter in result.dead_letters] == [
        (2, "default.events: column 'a': 1.5 is not an integer (Int64)"),
        (3, f"default.events: column 'a': {2**63} is out of range for Int64 "
            f"[{-2**63}, {2**63 - 1}]")]
    assert result.rejections == []  # json_fields took them all: the table refused these
    # Dead-lettered from every output, the stream too.
    assert [record["rec_id"] for record in result.streams["out"]] == ["1", "2"]


# -- passthrough ---------------------------------------------------------------------------
def test_passthrough_writes_each_entry_s_fields_unchanged() -> None:
    entries = [{"k": str(i), "text": "héllo"} for i in range(3)]
    result = run_handler("passthrough", entries, flow={
        "to": [{"stream": "cold"}, {"clickhouse": "t"}]},
        tables={"t": [("k", "UInt32"), ("text", "String")]})

    assert result.streams["cold"] == entries
    assert result.rows["t"] == [{"k": i, "text": "héllo"} for i in range(3)]


def test_passthrough_leaves_a_field_without_a_column_out_and_a_missing_one_to_its_default(
        ) -> None:
    table = [("k", "UInt32", ""), ("seen", "String", "DEFAULT", "'never'")]
    result = run_handler("passthrough", [{"k": "1", "extra": "x"}, {"k": "2", "seen": "now"}],
                         flow={"to": [{"clickhouse": "t"}]}, tables={"t": table})

    assert result.rows["t"] == [{"k": 1}, {"k": 2, "seen": "now"}]
    assert result.ignored_fields == {"t": 1}


def test_passthrough_rejects_nothing_itself_but_entries_that_are_not_text_never_reach_it(
        ) -> None:
    result = run_handler("passthrough", [{"k": "1"}, {"k": b"\xc3("}],
                         flow={"to": [{"stream": "cold"}], "dead_letter": "dead"})

    assert result.streams["cold"] == [{"k": "1"}]
    assert result.rejections == []
    assert result.dead_letters == [Rejected(
        1, "1-1", 'field "k" is not valid UTF-8: byte 0xc3 at offset 0 (invalid '
                  'continuation byte) of its 2-byte value', {"k": b"\xc3("})]
