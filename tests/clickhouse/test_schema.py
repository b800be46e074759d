"""Strict coercion of stream values to ClickHouse column types: never bend a value."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import orjson
import pytest

from flowd.clickhouse.schema import CoercionError, coercer_for, parse_describe

UTC = dt.UTC


@pytest.mark.parametrize(("type_", "value", "expected"), [
    ("Int64", "42", 42),
    ("Int32", "-5", -5),
    ("UInt8", "255", 255),
    ("UInt64", "18446744073709551615", 2**64 - 1),
    ("Int8", " 7 ", 7),
    ("Int16", 12, 12),
])
def test_strings_of_digits_become_integers(type_: str, value: Any, expected: int) -> None:
    assert coercer_for(type_)(value) == expected


def test_non_numeric_text_for_int64_rejects_naming_the_value_and_the_type() -> None:
    with pytest.raises(CoercionError) as excinfo:
        coercer_for("Int64")("abc")

    assert "'abc'" in str(excinfo.value)
    assert "Int64" in str(excinfo.value)


@pytest.mark.parametrize("value", [300, "300", "-1", -1, "256"])
def test_values_outside_uint8_reject_as_out_of_range(value: Any) -> None:
    with pytest.raises(CoercionError, match="out of range for UInt8"):
        coercer_for("UInt8")(value)


@pytest.mark.parametrize("value", ["1.5", 1.5, "3.0", "1e3"])
def test_a_fraction_for_an_integer_rejects_instead_of_truncating(value: Any) -> None:
    with pytest.raises(CoercionError, match=r"is not an integer \(Int32\)"):
        coercer_for("Int32")(value)


def test_a_whole_float_is_accepted_as_that_integer() -> None:
    result = coercer_for("Int32")(3.0)

    assert result == 3
    assert type(result) is int


@pytest.mark.parametrize(("value", "expected"), [("2.5", 2.5), (2, 2.0), ("-1e3", -1000.0)])
def test_float64_parses_numeric_text(value: Any, expected: float) -> None:
    assert coercer_for("Float64")(value) == expected


def test_float64_rejects_text_that_is_not_a_number() -> None:
    with pytest.raises(CoercionError, match="'abc' is not a number"):
        coercer_for("Float64")("abc")


@pytest.mark.parametrize("type_", ["Nullable(Int32)", "Nullable(String)", "Nullable(DateTime)",
                                   "LowCardinality(Nullable(String))"])
def test_nullable_columns_accept_none(type_: str) -> None:
    assert coercer_for(type_)(None) is None


def test_nullable_columns_still_check_their_values() -> None:
    assert coercer_for("Nullable(Int32)")("5") == 5
    with pytest.raises(CoercionError, match="Int32"):
        coercer_for("Nullable(Int32)")("five")


@pytest.mark.parametrize("type_", ["Int32", "UInt8", "Float64", "String", "Date", "DateTime",
                                   "Decimal(10, 2)", "UUID"])
def test_none_for_a_non_nullable_column_rejects_mentioning_null(type_: str) -> None:
    with pytest.raises(CoercionError, match="NULL"):
        coercer_for(type_)(None)


@pytest.mark.parametrize("type_", ["String", "LowCardinality(String)"])
def test_string_keeps_strings_as_they_are(type_: str) -> None:
    assert coercer_for(type_)(" a b ") == " a b "
    assert coercer_for(type_)("") == ""


@pytest.mark.parametrize("type_", ["String", "LowCardinality(String)"])
@pytest.mark.parametrize("value", [{"a": 1, "b": [True, None]}, [1, "x"], []])
def test_string_turns_dicts_and_lists_into_json_text(type_: str, value: Any) -> None:
    result = coercer_for(type_)(value)

    assert isinstance(result, str)
    assert orjson.loads(result) == value


def test_datetime_accepts_plain_date_and_time_text() -> None:
    assert coercer_for("DateTime")("2024-01-02 03:04:05") == dt.datetime(2024, 1, 2, 3, 4, 5)


def test_datetime_accepts_iso_8601_with_z_as_a_utc_aware_moment() -> None:
    result = coercer_for("DateTime")("2024-01-02T03:04:05Z")

    assert result.tzinfo is not None
    assert result.utcoffset() == dt.timedelta(0)
    assert result == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize("value", ["1700000000", 1700000000])
def test_datetime_accepts_unix_seconds_as_utc(value: Any) -> None:
    result = coercer_for("DateTime")(value)

    assert result == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert result.utcoffset() == dt.timedelta(0)


def test_datetime_rejects_text_that_is_not_a_date() -> None:
    with pytest.raises(CoercionError, match="'not a date' is not a date-time"):
        coercer_for("DateTime")("not a date")


@pytest.mark.parametrize("value", ["2200-01-01 00:00:00", "2200-01-01T00:00:00Z", "5000000000",
                                   "1969-12-31 23:59:59"])
def test_datetime_rejects_moments_outside_its_range(value: str) -> None:
    with pytest.raises(CoercionError, match="out of range for DateTime"):
        coercer_for("DateTime")(value)


def test_date_accepts_iso_dates() -> None:
    assert coercer_for("Date")("2024-01-02") == dt.date(2024, 1, 2)


def test_date_takes_the_day_of_a_whole_date_time() -> None:
    assert coercer_for("Date")("2024-01-02 03:04:05") == dt.date(2024, 1, 2)
    assert coercer_for("Date")("2024-01-02T03:04:05Z") == dt.date(2024, 1, 2)


@pytest.mark.parametrize("value", ["2024-13-01", "2024-02-30", "yesterday", "2024-01-02xyz",
                                   "2024-01-02 nonsense"])
def test_date_rejects_text_that_is_not_a_date(value: str) -> None:
    with pytest.raises(CoercionError, match="is not a date"):
        coercer_for("Date")(value)


@pytest.mark.parametrize("value", ["1969-12-31", "2150-01-01"])
def test_date_rejects_days_outside_its_range(value: str) -> None:
    with pytest.raises(CoercionError, match="out of range for Date"):
        coercer_for("Date")(value)


@pytest.mark.parametrize("value", ["[1,2]", [1, 2], ["1", "2"]])
def test_array_of_uint8_takes_json_text_or_lists(value: Any) -> None:
    assert coercer_for("Array(UInt8)")(value) == [1, 2]


def test_array_elements_are_checked_like_their_type() -> None:
    with pytest.raises(CoercionError, match="out of range for UInt8"):
        coercer_for("Array(UInt8)")("[1, 300]")


@pytest.mark.parametrize("value", ["not json", '{"a": 1}', "5"])
def test_array_rejects_anything_but_a_json_array(value: str) -> None:
    with pytest.raises(CoercionError, match="Array"):
        coercer_for("Array(UInt8)")(value)


@pytest.mark.parametrize(("type_", "value", "expected"), [
    ("Decimal(10, 2)", "1.25", decimal.Decimal("1.25")),
    ("Decimal(10, 2)", "1.230", decimal.Decimal("1.23")),
    ("Decimal(10, 2)", "-99999999.99", decimal.Decimal("-99999999.99")),
    ("Decimal(10, 2)", 7, decimal.Decimal(7)),
    ("Decimal64(4)", "12345678901234.5678", decimal.Decimal("12345678901234.5678")),
])
def test_decimal_accepts_values_that_fit_exactly(type_: str, value: Any,
                                                 expected: decimal.Decimal) -> None:
    assert coercer_for(type_)(value) == expected


def test_decimal_rejects_more_places_than_its_scale_instead_of_truncating() -> None:
    with pytest.raises(CoercionError, match="more than 2 decimal places"):
        coercer_for("Decimal(10, 2)")("1.239")


@pytest.mark.parametrize(("type_", "value"), [
    ("Decimal(10, 2)", "100000000"),
    ("Decimal(10, 2)", "1e9"),
    ("Decimal32(2)", "12345678"),
    ("Decimal(38, 2)", "1" + "0" * 40),
])
def test_decimal_rejects_values_beyond_its_precision(type_: str, value: str) -> None:
    with pytest.raises(CoercionError, match="out of range"):
        coercer_for(type_)(value)


def test_decimal_rejects_text_that_is_not_a_number() -> None:
    with pytest.raises(CoercionError, match="is not a decimal"):
        coercer_for("Decimal(10, 2)")("ten")


def test_low_cardinality_string_acts_like_string() -> None:
    low, plain = coercer_for("LowCardinality(String)"), coercer_for("String")

    for value in ["x", {"k": "v"}, [1], 5]:
        assert low(value) == plain(value)
    with pytest.raises(CoercionError, match="NULL"):
        low(None)


def test_parse_describe_skips_materialized_and_alias_and_marks_default_columns() -> None:
    rows = [
        ("id", "UInt64", "", "", "", "", ""),
        ("ts", "DateTime", "DEFAULT", "now()", "", "", ""),
        ("day", "Date", "MATERIALIZED", "toDate(ts)", "", "", ""),
        ("id_text", "String", "ALIAS", "toString(id)", "", "", ""),
        ("note", "Nullable(String)", "", "", "", "", ""),
    ]

    schema = parse_describe("default.events", rows)

    assert schema.table == "default.events"
    assert [c.name for c in schema.columns] == ["id", "ts", "note"]
    assert [c.has_default for c in schema.columns] == [False, True, False]
    assert schema.column("day") is None
    assert schema.column("id_text") is None


def test_parse_describe_gives_each_column_the_coercer_of_its_type() -> None:
    schema = parse_describe("t", [("n", "UInt8", ""), ("s", "String", "")])

    n, s = schema.column("n"), schema.column("s")
    assert n is not None and s is not None
    assert n.type == "UInt8"
    assert n.coerce("7") == 7
    with pytest.raises(CoercionError, match="out of range for UInt8"):
        n.coerce("300")
    assert s.coerce({"a": 1}) == '{"a":1}'


def test_parse_describe_accepts_rows_of_only_name_and_type() -> None:
    schema = parse_describe("t", [("n", "Int32")])

    assert [(c.name, c.has_default) for c in schema.columns] == [("n", False)]
