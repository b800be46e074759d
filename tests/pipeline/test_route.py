"""Routing (flowd.pipeline.route): each output's `when` picks its rows, in batch order; an
output without `when` gets every row; a row no output wants is counted, written nowhere.
A pure function of the flow's outputs and the rows: no server involved."""

from __future__ import annotations

from decimal import Decimal

from flowd.core.columns import ABSENT, Columns
from flowd.core.config import ClickHouseOutput, FlowConfig, StreamOutput
from flowd.pipeline.route import route

ORDERS = ClickHouseOutput("db.orders", when={"kind": "order"})
REFUNDS = ClickHouseOutput("db.refunds", when={"kind": "refund"})
EVERYTHING = StreamOutput("all.out")
EU_ORDERS = StreamOutput("eu.orders", when={"kind": "order", "region": "eu"})


def flow(*outputs: ClickHouseOutput | StreamOutput) -> FlowConfig:
    return FlowConfig(name="f", stream="in", group="g", handler="passthrough", to=outputs)


def rows(*records: dict[str, object]) -> Columns:
    return Columns.from_records((f"{i}-0", record) for i, record in enumerate(records))


BATCH = rows({"kind": b"order", "region": b"eu"}, {"kind": b"refund", "region": b"us"},
             {"kind": b"order", "region": b"us"}, {"kind": b"ping", "region": b"eu"})


def test_each_output_gets_the_rows_its_when_matches_in_batch_order() -> None:
    routed = route(flow(ORDERS, REFUNDS, EU_ORDERS).to, BATCH)
    assert [(out, selected.ids) for out, selected in routed.tables] == [
        (ORDERS, ["0-0", "2-0"]), (REFUNDS, ["1-0"])]
    # every field of `when` must match
    assert [(out, selected.ids) for out, selected in routed.streams] == [(EU_ORDERS, ["0-0"])]
    assert routed.unrouted == 1  # the "ping": acked, written nowhere


def test_an_output_without_when_gets_every_row_and_nothing_is_unrouted() -> None:
    routed = route(flow(ORDERS, EVERYTHING).to, BATCH)
    assert [(out, selected.ids) for out, selected in routed.streams] == [
        (EVERYTHING, ["0-0", "1-0", "2-0", "3-0"])]
    assert routed.tables[0][1].ids == ["0-0", "2-0"]
    assert routed.unrouted == 0


def test_an_output_no_row_matches_is_left_out() -> None:
    routed = route(flow(REFUNDS).to, rows({"kind": b"order"}, {"kind": b"ping"}))
    assert routed.tables == [] and routed.streams == []
    assert routed.unrouted == 2


def test_values_a_handler_made_are_compared_as_their_text() -> None:
    when = {"n": "7", "ok": "True", "price": "1.50", "tag": "x"}
    out = ClickHouseOutput("db.t", when=when)
    batch = rows({"n": 7, "ok": True, "price": Decimal("1.50"), "tag": "x"},  # matches
                 {"n": 7, "ok": 1, "price": Decimal("1.50"), "tag": "x"},  # 1 is not "True"
                 {"n": "8", "ok": True, "price": Decimal("1.50"), "tag": "x"},  # "8"
                 {"n": 7, "ok": True, "price": Decimal("1.50"), "tag": None},  # None: no match
                 {"n": 7, "ok": True, "price": Decimal("1.50"), "tag": ["x"]})  # a list
    routed = route(flow(out).to, batch)
    assert routed.tables[0][1].ids == ["0-0"]
    assert routed.unrouted == 4


def test_equal_numbers_with_different_text_are_told_apart() -> None:
    out = ClickHouseOutput("db.t", when={"price": "1.50"})
    batch = rows({"price": Decimal("1.50")}, {"price": Decimal("1.5")})
    assert route(flow(out).to, batch).tables[0][1].ids == ["0-0"]
    zero = ClickHouseOutput("db.t", when={"x": "-0.0"})
    assert route(flow(zero).to, rows({"x": 0.0}, {"x": -0.0})).tables[0][1].ids == ["1-0"]


def test_a_row_lacking_a_when_field_matches_no_output_that_names_it() -> None:
    batch = Columns(["1-0", "2-0"], {"kind": [b"order", ABSENT]})
    assert route(flow(ORDERS).to, batch).tables[0][1].ids == ["1-0"]
    assert route(flow(ORDERS).to, Columns(["1-0"], {"other": [b"order"]})).unrouted == 1


def test_an_empty_batch_routes_nothing() -> None:
    routed = route(flow(ORDERS, EVERYTHING).to, Columns([]))
    assert (routed.tables, routed.streams, routed.unrouted) == ([], [], 0)
