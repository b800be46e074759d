"""ClickHouse column types and the strict coercion of record values to them.

Stream fields are strings, so every value needs converting before a columnar insert.
Conversion never changes a value silently: "1.5" is not an integer, 300 is not a UInt8,
and such a value rejects its row (to the dead-letter stream) instead of being bent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from flowd.core.errors import CoercionError

__all__ = ["Column", "TableSchema", "as_text", "coercer_for", "column_coercer_for",
           "parse_describe"]


Coercer = Callable[[Any], Any]
ColumnCoercer = Callable[[list[Any]], list[Any]]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    has_default: bool  # DEFAULT expression: may be left out of an insert
    coerce: Coercer
    coerce_all: ColumnCoercer  # a whole column at once: the fast path, same rules


def column_coercer_for(type_: str, coerce: Coercer) -> ColumnCoercer:
    """Whole-column conversion, by the same rules as `coerce` one value at a time.

    Where every value already has the right form the checks run in C (type sets,
    bytes.isdigit, min/max, one UTF-8 check per column) instead of once per value in
    Python. Values may be the bytes read from Redis. Any value that does not pass raises
    CoercionError, and the caller goes value by value to name it.
    """
    type_ = type_.strip()
    if inner := _unwrap(type_, "LowCardinality"):
        return column_coercer_for(inner, coercer_for(inner))
    if inner := _unwrap(type_, "Nullable"):
        return _nullable_column(column_coercer_for(inner, coercer_for(inner)))
    if type_ == "String":
        return _string_column
    if type_ in _INT_RANGES:
        return _integer_column(type_, coerce)
    if type_ in ("Float32", "Float64"):
        return _float_column
    if type_ == "DateTime" or type_.startswith("DateTime("):
        return _datetime_column(coerce, checked=True)
    if type_.startswith("DateTime64"):
        return _datetime_column(coerce, checked=False)
    return lambda values: list(map(coerce, as_text(values)))


def as_text(values: list[Any]) -> list[Any]:
    """Values with bytes decoded (every other kind as it is): what the one-value coercers
    take, so that their messages quote text, not bytes."""
    if bytes not in set(map(type, values)):
        return values
    return [_text(value) for value in values]


def _text(value: Any) -> Any:
    if type(value) is bytes:
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value  # the coercer says why it cannot take it
    return value


def _string_column(values: list[Any]) -> list[Any]:
    kinds = set(map(type, values))
    if kinds <= {str}:
        return values
    if kinds <= {str, bytes}:
        # bytes pass through as they were read, once checked (NUL-joined: see decode.py)
        try:
            b"\x00".join(value for value in values if type(value) is bytes).decode()
            return values
        except UnicodeDecodeError:
            pass
    return list(map(_string, values))


def _integer_column(type_: str, coerce: Coercer) -> ColumnCoercer:
    low, high = _INT_RANGES[type_]

    def integers(values: list[Any]) -> list[Any]:
        kinds = set(map(type, values))
        numbers: list[Any] | None = None
        if kinds <= {int}:
            numbers = values
        elif kinds == {bytes} or kinds == {str}:
            joined = values[0][:0].join(values)
            if joined.isascii() and joined.isdigit() and values[0][:0] not in values:
                numbers = list(map(int, values))  # plain digits: the usual case
            elif joined.isascii() and ("_" not in joined if kinds == {str} else b"_" not in joined):
                # int() takes what _integer does (sign, surrounding space) plus "1_000",
                # ruled out here; ASCII rules out other scripts' digits
                with contextlib.suppress(ValueError):
                    numbers = list(map(int, values))
        if numbers is None or (numbers and (min(numbers) < low or max(numbers) > high)):
            return list(map(coerce, as_text(values)))  # the slow path names the bad value
        return numbers
    return integers


_EPOCH = dt.datetime(1970, 1, 1)
_LAST = dt.datetime(2106, 12, 31, 23, 59, 59, 999_999)
_EPOCH_UTC = _EPOCH.replace(tzinfo=dt.UTC)
_LAST_UTC = dt.datetime.fromtimestamp(2**32 - 1, tz=dt.UTC)


def _datetime_column(coerce: Coercer, *, checked: bool) -> ColumnCoercer:
    """ISO-8601 text (with "Z" or an offset, or naive) parsed in C; the range checked on
    the column's min and max. Anything else goes value by value."""
    def datetimes(values: list[Any]) -> list[Any]:
        texts = as_text(values)
        # A date-time written as a date: "YYYY-" (a number of digits alone is a timestamp)
        if set(map(type, texts)) == {str} and all(text[4:5] == "-" for text in texts):
            try:
                moments = list(map(dt.datetime.fromisoformat, texts))
            except ValueError:
                moments = None
            if moments is not None and _in_range(moments, checked):
                return moments
        return list(map(coerce, texts))
    return datetimes


def _in_range(moments: list[dt.datetime], checked: bool) -> bool:
    if not checked or not moments:
        return True
    zones = {moment.tzinfo is None for moment in moments}
    if zones == {True}:
        return min(moments) >= _EPOCH and max(moments) <= _LAST
    if zones == {False}:
        return min(moments) >= _EPOCH_UTC and max(moments) <= _LAST_UTC
    return False  # naive and aware together cannot be compared: one by one


def _float_column(values: list[Any]) -> list[Any]:
    if bool in set(map(type, values)):
        return list(map(_float, values))
    try:  # float() reads str and bytes alike, by _float's rules
        return list(map(float, values))
    except (ValueError, OverflowError, TypeError):
        return list(map(_float, as_text(values)))


def _nullable_column(inner: ColumnCoercer) -> ColumnCoercer:
    def nullable(values: list[Any]) -> list[Any]:
        if None not in values:
            return inner(values)
        present = [i for i, value in enumerate(values) if value is not None]
        out: list[Any] = [None] * len(values)
        for i, value in zip(present, inner([values[i] for i in present]), strict=True):
            out[i] = value
        return out
    return nullable


@dataclass(frozen=True, slots=True)
class TableSchema:
    table: str
    columns: tuple[Column, ...]  # insertable ones only (no MATERIALIZED / ALIAS)

    def column(self, name: str) -> Column | None:
        for column in self.columns:
            if column.name == name:
                return column
        return None


def parse_describe(table: str, rows: list[tuple]) -> TableSchema:
    """Build a schema from `DESCRIBE TABLE` rows (name, type, default_kind, ...)."""
    columns = []
    for row in rows:
        name, type_, default_kind = row[0], row[1], row[2] if len(row) > 2 else ""
        if default_kind in ("MATERIALIZED", "ALIAS", "EPHEMERAL"):
            continue
        coerce = coercer_for(type_)
        columns.append(Column(name, type_, default_kind == "DEFAULT", coerce,
                              column_coercer_for(type_, coerce)))
    return TableSchema(table, tuple(columns))


_INT_RANGES = {
    f"{sign}Int{bits}": ((0, 2**bits - 1) if sign else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    for sign in ("", "U") for bits in (8, 16, 32, 64, 128, 256)
}


def _unwrap(type_: str, wrapper: str) -> str | None:
    prefix = wrapper + "("
    if type_.startswith(prefix) and type_.endswith(")"):
        return type_[len(prefix):-1]
    return None


def coercer_for(type_: str) -> Coercer:
    type_ = type_.strip()
    if inner := _unwrap(type_, "LowCardinality"):
        return coercer_for(inner)
    if inner := _unwrap(type_, "Nullable"):
        convert = coercer_for(inner)
        return lambda value: None if value is None else convert(value)
    if inner := _unwrap(type_, "Array"):
        return _array(coercer_for(inner))
    if type_ in _INT_RANGES:
        low, high = _INT_RANGES[type_]
        return _integer(type_, low, high)
    if type_ in _PLAIN:
        return _PLAIN[type_]
    return _parametric(type_)


def _parametric(type_: str) -> Coercer:
    """Types whose name carries parameters: FixedString(N), DateTime('tz'), Decimal, Enum."""
    if m := re.fullmatch(r"FixedString\((\d+)\)", type_):
        return _fixed_string(int(m.group(1)))
    if type_ == "DateTime" or type_.startswith("DateTime("):
        return _datetime(type_, low=0, high=2**32 - 1)
    if type_.startswith("DateTime64"):
        return _datetime(type_, low=None, high=None)
    if m := re.fullmatch(r"Decimal(32|64|128|256)?\((\d+)(?:,\s*(\d+))?\)", type_):
        bits, first, second = m.groups()
        if bits:  # DecimalNN(S)
            precision, scale = {"32": 9, "64": 18, "128": 38, "256": 76}[bits], int(first)
        else:  # Decimal(P[, S])
            precision, scale = int(first), int(second or 0)
        return _decimal(type_, precision, scale)
    if type_.startswith(("Enum8(", "Enum16(")):
        return _required_str(type_)
    return _passthrough


def _null_check(type_: str, value: Any) -> None:
    if value is None:
        raise CoercionError(f"NULL for non-Nullable column of type {type_}")


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def _integer(type_: str, low: int, high: int) -> Coercer:
    def convert(value: Any) -> int:
        _null_check(type_, value)
        if isinstance(value, bool):
            number = int(value)
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float):
            if not value.is_integer():
                raise CoercionError(f"{value!r} is not an integer ({type_})")
            number = int(value)
        elif isinstance(value, str):
            text = value.strip()
            # ASCII digits only: Python's int() also takes "1_000" and other scripts' digits.
            if not _INTEGER_TEXT.fullmatch(text):
                raise CoercionError(f"{value!r} is not an integer ({type_})")
            number = int(text)
        else:
            raise CoercionError(f"{type(value).__name__} {value!r} is not an integer ({type_})")
        if not low <= number <= high:
            raise CoercionError(f"{number} is out of range for {type_} [{low}, {high}]")
        return number
    return convert


def _float(value: Any) -> float:
    _null_check("Float", value)
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            pass
    raise CoercionError(f"{value!r} is not a number (Float)")


_TRUE, _FALSE = {"1", "true", "True", "TRUE"}, {"0", "false", "False", "FALSE"}


def _bool(value: Any) -> bool:
    _null_check("Bool", value)
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and (value in _TRUE or value in _FALSE):
        return value in _TRUE
    raise CoercionError(f"{value!r} is not a boolean (Bool)")


def _string(value: Any) -> str:
    if isinstance(value, str):
        return value
    _null_check("String", value)
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise CoercionError("bytes that are not UTF-8 text for a String column") from None
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def _fixed_string(size: int) -> Coercer:
    def convert(value: Any) -> str:
        text = _string(value)
        if len(text.encode()) > size:
            raise CoercionError(f"{text!r} is longer than FixedString({size})")
        return text
    return convert


def _required_str(type_: str) -> Coercer:
    def convert(value: Any) -> str:
        _null_check(type_, value)
        return str(value)
    return convert


_EPOCH_DATE = dt.date(1970, 1, 1)


def _date(value: Any) -> dt.date:
    _null_check("Date", value)
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:  # a date, or a whole date-time (never a date followed by anything at all)
            parsed = dt.date.fromisoformat(text) if len(text) <= 10 else \
                dt.datetime.fromisoformat(text.replace("Z", "+00:00")).date()
        except ValueError:
            raise CoercionError(f"{value!r} is not a date (Date, YYYY-MM-DD)") from None
        if parsed < _EPOCH_DATE or parsed > dt.date(2149, 6, 6):
            raise CoercionError(f"{value!r} is out of range for Date")
        return parsed
    raise CoercionError(f"{value!r} is not a date (Date)")


def _datetime(type_: str, *, low: int | None, high: int | None) -> Coercer:
    def convert(value: Any) -> dt.datetime:
        _null_check(type_, value)
        if isinstance(value, dt.datetime):
            moment = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            moment = _from_timestamp(value, type_)
        elif isinstance(value, str):
            text = value.strip()
            if re.fullmatch(r"\d+(\.\d+)?", text):
                moment = _from_timestamp(float(text), type_)
            else:
                try:
                    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
                except ValueError:
                    raise CoercionError(f"{value!r} is not a date-time ({type_}, "
                                        "YYYY-MM-DD hh:mm:ss or ISO 8601)") from None
        else:
            raise CoercionError(f"{value!r} is not a date-time ({type_})")
        if low is not None and moment.tzinfo is not None:
            stamp = moment.timestamp()
            if not low <= stamp <= high:
                raise CoercionError(f"{value!r} is out of range for {type_}")
        elif low is not None and not 1970 <= moment.year <= 2106:
            raise CoercionError(f"{value!r} is out of range for {type_}")
        return moment
    return convert


def _from_timestamp(stamp: float, type_: str) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(stamp, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise CoercionError(f"{stamp!r} is out of range for {type_}") from None


def _decimal(type_: str, precision: int, scale: int) -> Coercer:
    def convert(value: Any) -> decimal.Decimal:
        _null_check(type_, value)
        try:
            number = decimal.Decimal(str(value).strip())
        except decimal.InvalidOperation:
            raise CoercionError(f"{value!r} is not a decimal ({type_})") from None
        if not number.is_finite():
            raise CoercionError(f"{value!r} is not a finite decimal ({type_})")
        # clickhouse-driver truncates extra places (1.239 -> 1.23) and wraps or fails the
        # whole insert past the precision: reject the value instead.
        _, digits, exponent = number.as_tuple()
        extra = -int(exponent) - scale  # digits below the column's scale
        if extra > 0 and any(digits[-extra:]):
            raise CoercionError(f"{value!r} has more than {scale} decimal places ({type_})")
        if any(digits) and number.adjusted() >= precision - scale:
            raise CoercionError(f"{value!r} is out of range for {type_}")
        return number
    return convert


def _uuid(value: Any) -> uuid.UUID:
    _null_check("UUID", value)
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise CoercionError(f"{value!r} is not a UUID") from None


def _array(convert: Coercer) -> Coercer:
    def coerce(value: Any) -> list:
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise CoercionError(f"{value!r} is not a JSON array (Array)") from None
        if not isinstance(value, (list, tuple)):
            raise CoercionError(f"{value!r} is not an array (Array)")
        return [convert(item) for item in value]
    return coerce


def _passthrough(value: Any) -> Any:
    return value


# Types named in full, without parameters (coercer_for looks here after the wrappers).
_PLAIN: dict[str, Coercer] = {
    "Float32": _float, "Float64": _float, "Bool": _bool, "String": _string, "Date": _date,
    "UUID": _uuid,
}
