"""The example handlers, tested as their package's author would: offline, with
flowd.testing, and no Redis or ClickHouse anywhere. flowd runs the same stages on the same
messages (tests/test_testing.py checks that against a real daemon)."""

from __future__ import annotations

import os

from flowd.testing import Rejected, flow_from_toml, run_handler
from flowd_example_plugins import Shout

# DESCRIBE TABLE names, as a list: what the rows are coerced to.
NAMES = [("name", "String"), ("age", "UInt8"), ("city", "String")]

SHOUTING = """
[[flow]]
name = "shouting"
stream = "names.in"
group = "flowd"
handler = "shout"
options = { field = "name", suffix = "?!" }
dead_letter = "names.dead"

  [[flow.to]]
  clickhouse = "names"

  [[flow.to]]
  stream = "names.paris"
  when = { city = "Paris" }
"""


def test_shout_upper_cases_the_field_and_dead_letters_messages_without_it() -> None:
    result = run_handler("shout", [{"name": "ann", "age": "31", "city": "Oslo"},
                                   {"age": "40", "city": "Rome"}],
                         flow=flow_from_toml(SHOUTING), tables={"names": NAMES})

    assert result.rows["names"] == [{"name": "ANN?!", "age": 31, "city": "Oslo"}]
    no_name = Rejected(1, "1-1", "no field 'name'", {"age": "40", "city": "Rome"})
    assert result.rejections == [no_name]
    assert result.dead_letters == [no_name]
    assert result.pending == []


def test_a_value_the_table_cannot_take_dead_letters_that_message_alone() -> None:
    result = run_handler("shout", [{"name": "ann", "age": "300", "city": "Oslo"},
                                   {"name": "bob", "age": "7", "city": "Paris"}],
                         flow=flow_from_toml(SHOUTING), tables={"names": NAMES})

    assert [(letter.index, letter.reason) for letter in result.dead_letters] == [
        (0, "default.names: column 'age': 300 is out of range for UInt8 [0, 255]")]
    assert result.rows["names"] == [{"name": "BOB?!", "age": 7, "city": "Paris"}]
    # Routed by `when`, and written as the stream holds it: text.
    assert result.streams["names.paris"] == [{"name": "BOB?!", "age": "7", "city": "Paris"}]


def test_shout_given_as_an_object_with_its_own_options() -> None:
    result = run_handler(Shout(field="city", suffix=""), [{"city": "oslo"}],
                         flow={"to": [{"stream": "out"}]})

    assert result.streams["out"] == [{"city": "OSLO"}]


def test_pid_stamp_is_cpu_bound_yet_runs_in_this_process_offline() -> None:
    result = run_handler("pid_stamp", [{"name": "ann"}], flow={"to": [{"stream": "out"}]})

    assert result.streams["out"] == [{"name": "ann", "pid": str(os.getpid())}]


def test_frame_total_adds_up_a_and_b_in_a_dataframe() -> None:
    result = run_handler("frame_total", [{"rec_id": "1", "a": "2", "b": "40"}],
                         flow={"to": [{"clickhouse": "totals"}]},
                         tables={"totals": [("rec_id", "UInt64"), ("total", "Int64")]})

    assert result.rows["totals"] == [{"rec_id": 1, "total": 42}]


def test_a_message_explode_on_raises_on_is_held_back_and_the_others_go_on() -> None:
    result = run_handler("explode_on", [{"k": "1"}, {"k": "boom"}, {"k": "3"}],
                         flow={"options": {"field": "k", "value": "boom"},
                               "to": [{"stream": "out"}], "dead_letter": "dead"})

    assert result.streams["out"] == [{"k": "1"}, {"k": "3"}]
    assert result.dead_letters == []  # not yet: retried up to max_deliveries first
    assert [(held.index, held.reason) for held in result.pending] == [
        (1, "handler 'explode_on' raised RuntimeError('cannot handle k=boom')")]
