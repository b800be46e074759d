"""Whole-column coercion gives exactly what coercing value by value gives: the same values
for the rows that pass, the same reason for the rows that do not, bytes or text alike."""

from __future__ import annotations

from typing import Any

import pytest

from flowd.clickhouse.prepare import prepare
from flowd.clickhouse.schema import as_text, parse_describe
from flowd.core.columns import ABSENT, Columns
from flowd.core.errors import CoercionError

VALUES: dict[str, list[Any]] = {
    "UInt8": ["7", "300", "-1", " 5 ", "+4", "1_0", "٣", "", "1.5", 9, True, None],
    "Int64": ["-5", "12", "x", " -7", "9223372036854775808", 3, 2.0, 2.5],
    "Float64": ["1.5", "nan", "-inf", "1e3", "abc", "1_0.5", 2, True, None, ""],
    "String": ["ok", "é", 5, 1.5, True, {"a": 1}, [1], None],
    "Nullable(Int32)": ["1", None, "x", "-2"],
    "Nullable(String)": ["a", None, "b"],
    "DateTime": ["2024-05-06 07:08:09", "2013-01-01T05:00:00Z", "2013-01-01T05:00:00+02:00",
                 "1700000000", "20130101", "yesterday", "1969-12-31 23:59:59",
                 "2107-01-01 00:00:00", " 2024-05-06 07:08:09", 1700000000, None],
    "DateTime64(3)": ["2024-05-06 07:08:09.123", "2013-01-01T05:00:00Z", "nope"],
    "Date": ["2024-05-06", "2024-05-06T01:02:03Z", "06/05/2024"],
    "Decimal(9, 2)": ["1.23", "1.239", "abc"],
    "LowCardinality(String)": ["x", "y"],
    "FixedString(2)": ["ab", "abc"],
}


def _reference(type_: str, values: list[Any]) -> list[tuple[str, Any]]:
    """Value by value, the way a row is checked alone."""
    schema = parse_describe("t", [("c", type_, "")])
    column = schema.columns[0]
    out: list[tuple[str, Any]] = []
    for value in as_text(values):
        try:
            out.append(("ok", column.coerce(value)))
        except CoercionError as exc:
            out.append(("rejected", f"t: column 'c': {exc}"))
    return out


def _whole(type_: str, values: list[Any]) -> list[tuple[str, Any]]:
    schema = parse_describe("t", [("c", type_, "")])
    ids = [f"1-{i}" for i in range(len(values))]
    prepared = prepare(schema, Columns(list(ids), {"c": list(values)}))
    reasons = dict(prepared.rejected)
    (block,) = prepared.groups.values() if prepared.groups else (None,)
    passed = dict(zip(block.sources, block.columns[0], strict=True)) if block else {}
    return [("rejected", reasons[i]) if i in reasons else ("ok", passed[i]) for i in ids]


def _as_sent(value: Any) -> str:
    """Comparable: bytes as the text they carry, and NaN equal to NaN."""
    return repr(value.decode() if isinstance(value, bytes) else value)


@pytest.mark.parametrize("type_", sorted(VALUES))
@pytest.mark.parametrize("as_bytes", [False, True], ids=["text", "bytes"])
def test_a_whole_column_is_coerced_exactly_as_value_by_value(type_: str, as_bytes: bool) -> None:
    values = VALUES[type_]
    if as_bytes:  # as read from Redis
        values = [v.encode() if isinstance(v, str) else v for v in values]
    expected = [(kind, _as_sent(value)) for kind, value in _reference(type_, values)]
    got = [(kind, _as_sent(value)) for kind, value in _whole(type_, values)]
    assert got == expected
    # and each value alone, in a column of its own, agrees too (no batch-level shortcut)
    for value, want in zip(values, expected, strict=True):
        assert [(k, _as_sent(v)) for k, v in _whole(type_, [value])] == [want]


def test_a_missing_field_uses_the_default_null_or_rejects_naming_the_first_column() -> None:
    schema = parse_describe("t", [("a", "UInt8", ""), ("d", "String", "DEFAULT"),
                                  ("n", "Nullable(String)", ""), ("s", "String", ""),
                                  ("nd", "Nullable(String)", "DEFAULT")])
    rows = Columns(["1", "2", "3", "4"], {
        "a": [b"1", b"2", ABSENT, b"x"], "d": [b"d", ABSENT, b"d", b"d"],
        "nd": [b"v", ABSENT, ABSENT, ABSENT],
        "n": [ABSENT, b"n", b"n", b"n"], "s": [b"s", b"s", ABSENT, ABSENT],
        "extra": [b"e", ABSENT, b"e", b"e"]})
    prepared = prepare(schema, rows)
    assert prepared.rejected == [
        ("3", "t: no field for column 'a' (UInt8, no DEFAULT)"),
        ("4", "t: column 'a': 'x' is not an integer (UInt8)"),
    ]
    assert {names: block.sources for names, block in prepared.groups.items()} == {
        ("a", "d", "n", "s", "nd"): ["1"], ("a", "n", "s"): ["2"]}  # DEFAULT beats NULL
    assert prepared.groups[("a", "d", "n", "s", "nd")].columns[2] == [None]  # NULL, not absent
    assert prepared.ignored_fields == 1  # "extra" of row 1 (row 2 has none; 3, 4 rejected)


def test_a_row_filling_no_column_is_rejected_as_such() -> None:
    schema = parse_describe("t", [("d", "String", "DEFAULT")])
    prepared = prepare(schema, Columns(["1"], {"other": [b"x"]}))
    assert prepared.rejected == [("1", "t: no field matches any column of the table")]
    assert not prepared.groups
