"""Typed reads of one TOML table, and the checks of single values they apply.

Every failure raises ConfigError naming the file, the flow and the key, because the person
reading it is looking at that file in an editor and wants to jump to the line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flowd.core.errors import ConfigError
from flowd.core.secret import secret_names

__all__ = ["IDENTIFIER", "Section", "identifier", "kind_of", "non_empty", "non_negative",
           "positive", "table_name"]

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")  # \Z: "$" would allow a trailing "\n"


def _password_hint(kind: str, server: str) -> str:
    env, credential = secret_names(kind, server)
    return f"passwords are not read from the file: set {env} or the systemd credential " \
           f"{credential}"


class Section:
    """Typed reads of one TOML table, each failure located by file/flow/key."""

    def __init__(self, path: Path, table: Any, *, prefix: str, flow: str | None = None,
                 known: Iterable[str], kind: str = "flow") -> None:
        self.path, self.prefix, self.flow, self.kind = path, prefix, flow, kind
        if not isinstance(table, dict):
            self.fail(None, f"must be a table, got {kind_of(table)}")
        self.table: dict[str, Any] = table
        kind, _, server = prefix.rstrip(".").partition(".")
        if "password" in table and kind in ("redis", "clickhouse") and flow is None:
            self.fail("password", _password_hint(kind, server))
        for key in table:
            if key not in known:
                self.fail(key, f"unknown key (known: {', '.join(sorted(known))})")

    def key(self, name: str | None) -> str:
        if name is None:
            return self.prefix.rstrip(".")
        return f"{self.prefix}{name}"

    def fail(self, name: str | None, message: str) -> None:
        raise ConfigError(self.path, message, flow=self.flow, key=self.key(name) or None,
                          kind=self.kind)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...,
            check: Callable[[Any], str | None] | None = None) -> Any:
        if name not in self.table:
            if default is ...:
                self.fail(name, "is required")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int to Python, but `batch = true` is a mistake worth naming.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.fail(name, f"must be {' or '.join(_KIND_NAMES[k] for k in kinds)}, "
                            f"got {kind_of(value)} {value!r}")
        if check is not None and (problem := check(value)):
            self.fail(name, problem)
        return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "a table", list: "an array"}


def kind_of(value: Any) -> str:
    return {str: "string", int: "integer", float: "float", bool: "boolean", dict: "table",
            list: "array"}.get(type(value), type(value).__name__)


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def identifier(value: str) -> str | None:
    return None if IDENTIFIER.match(value) else (
        f"{value!r} is not a plain identifier (letters, digits, _; not starting with a digit)")


def table_name(value: str) -> str | None:
    parts = value.split(".")
    if len(parts) > 2 or any(not IDENTIFIER.match(part) for part in parts):
        return f"{value!r} is not a table name of the form table or database.table " \
               "(plain identifiers only)"
    return None
