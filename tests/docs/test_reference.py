"""docs/configuration.md against the config loader, both ways: every key the loader accepts
is documented there, every key documented there is accepted, and every documented default
is the default of the config's dataclasses.

The accepted keys are the loader's own: a section given a key it does not know is refused
with `unknown key (known: ...)`, listing what that section takes; each section is asked so.
A key the page calls required where the dataclass has a default (a source's `to`) is
checked against the loader instead: a minimal valid config without it is refused.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowd.core.config import (
    ClickHouseConfig,
    ClickHouseOutput,
    DaemonConfig,
    FlowConfig,
    HttpConfig,
    HttpToken,
    MoveConfig,
    RedisConfig,
    SourceConfig,
    StreamOutput,
    parse,
)
from flowd.core.errors import ConfigError

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
BOGUS = "no_such_key"
FLOW = {"name": "f", "stream": "s", "group": "g", "handler": "h"}
# Each section as the page names it: a config holding BOGUS in that section (the loader
# tells what it accepts there), and the dataclasses its keys land in (for the defaults).
SECTIONS: dict[str, tuple[dict[str, Any], tuple[type, ...]]] = {
    "[redis]": ({"redis": {BOGUS: 1}}, (RedisConfig,)),
    "[redis.NAME]": ({"redis": {"edge": {BOGUS: 1}}}, (RedisConfig,)),
    "[clickhouse]": ({"clickhouse": {BOGUS: 1}}, (ClickHouseConfig,)),
    "[clickhouse.NAME]": ({"clickhouse": {"cold": {BOGUS: 1}}}, (ClickHouseConfig,)),
    "[daemon]": ({"daemon": {BOGUS: 1}}, (DaemonConfig,)),
    "[http]": ({"http": {BOGUS: 1}}, (HttpConfig,)),
    "[http.tokens.NAME]": ({"http": {"tokens": {"ops": {BOGUS: 1}}}}, (HttpToken,)),
    "[[flow]]": ({"flow": [{**FLOW, BOGUS: 1}]}, (FlowConfig,)),
    "[[flow.to]]": ({"flow": [{**FLOW, "to": [{BOGUS: 1}]}]},
                    (ClickHouseOutput, StreamOutput)),
}
SOURCE = {"name": "s", "clickhouse": "t", "cursor": "id", "every": "30s",
          "to": [{"stream": "out"}]}
MOVE = {"name": "m", "table": "hot", "to": {"clickhouse": "cold"}, "older_than": "30d",
        "via": "v", "every": "1h"}
# Sections whose table sits in a minimal valid config: (that table, the config made around
# a table put in its place, the dataclasses its keys land in).
Place = Callable[[dict[str, Any]], dict[str, Any]]
MINIMAL: dict[str, tuple[dict[str, Any], Place, tuple[type, ...]]] = {
    "[[source]]": (SOURCE, lambda t: {"source": [t]}, (SourceConfig,)),
    "[[source.to]]": (SOURCE["to"][0], lambda t: {"source": [{**SOURCE, "to": [t]}]},
                      (StreamOutput,)),
    "[[move]]": (MOVE, lambda t: {"move": [t]}, (MoveConfig,)),
    "[move.to]": (MOVE["to"], lambda t: {"move": [{**MOVE, "to": t}]}, (ClickHouseOutput,)),
}
SECTIONS.update({name: (place({**table, BOGUS: 1}), classes)
                 for name, (table, place, classes) in MINIMAL.items()})
HEADING = re.compile(r"^#{2,4} (`\[.*)$")
ROW = re.compile(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|")


def accepted(raw: dict[str, Any]) -> set[str]:
    """The keys the loader accepts where `raw` put BOGUS, from its own refusal."""
    with pytest.raises(ConfigError) as refused:
        parse(raw, "config.toml")
    found = re.fullmatch(r"unknown key \(known: (.*)\)", refused.value.message)
    assert found and refused.value.key.endswith(BOGUS), str(refused.value)
    return set(found.group(1).split(", "))


def documented() -> dict[str, dict[str, str]]:
    """Each section heading's names (`[redis]` and `[redis.NAME]` share one table) →
    {key: its default cell}, from the page's tables."""
    sections: dict[str, dict[str, str]] = {}
    rows: dict[str, str] | None = None
    fenced = False
    for line in PAGE.read_text().splitlines():
        fenced = fenced != line.startswith("```")
        if fenced:
            continue
        if line.startswith("#"):
            heading = HEADING.match(line)
            rows = {} if heading else None
            for name in re.findall(r"`(\[\[?[\w.]+\]\]?)`", heading.group(1) if heading else ""):
                sections[name] = rows  # type: ignore[assignment]
        elif rows is not None and (row := ROW.match(line)):
            rows[row.group(1)] = row.group(2).strip()
    return sections


def test_the_page_has_a_section_for_every_table_the_loader_takes() -> None:
    top = {name.strip("[]").split(".")[0] for name in documented()}
    assert top == accepted({BOGUS: 1}), "top-level tables of config.toml vs the page's"
    assert set(documented()) == set(SECTIONS), \
        "the page's section headings vs the sections this test asks the loader about"


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_the_loader_accepts_is_documented_and_no_other(section: str) -> None:
    keys, page = accepted(SECTIONS[section][0]), set(documented()[section])
    assert sorted(keys - page) == [], f"{PAGE.name} {section}: accepted, not documented"
    assert sorted(page - keys) == [], f"{PAGE.name} {section}: documented, not accepted"


@pytest.mark.parametrize("section", SECTIONS)
def test_every_documented_default_is_the_code_default(section: str) -> None:
    classes = SECTIONS[section][1]
    wrong = {}
    for key, cell in documented()[section].items():
        field = next((f for cls in classes for f in dataclasses.fields(cls) if f.name == key),
                     None)
        if field is None:  # `clickhouse` of a table output lands in `table`: no default
            assert cell.startswith(MISSING), f"{PAGE.name} {section} {key}: no field of " \
                f"{[c.__name__ for c in classes]} has its name, so no default: {cell}"
            continue
        said, real = page_default(cell), code_default(field)
        if said == MISSING and section in MINIMAL:
            continue  # required by the loader, not the dataclass: the test below
        if said != real:
            wrong[key] = (said, real)
    assert wrong == {}, f"{PAGE.name} {section}: key: (the page's default, the code's)"


@pytest.mark.parametrize("section", MINIMAL)
def test_every_key_documented_as_required_is_refused_when_left_out(section: str) -> None:
    table, place, _ = MINIMAL[section]
    parse(place(table), "config.toml")  # the minimal config loads
    required = {key for key, cell in documented()[section].items() if cell.startswith(MISSING)}
    assert sorted(required - set(table)) == [], "documented required, not in the minimal one"
    loaded = [key for key in sorted(required) if loads_without(place, table, key)]
    assert loaded == [], f"{PAGE.name} {section}: documented required, loads without"


def loads_without(place: Place, table: dict[str, Any], key: str) -> bool:
    try:
        parse(place({k: v for k, v in table.items() if k != key}), "config.toml")
    except ConfigError:
        return False
    return True


MISSING = "required"


def page_default(cell: str) -> Any:
    """A default cell: a TOML value in backticks, `unset` (None) or `required`."""
    if cell.startswith(MISSING):
        return MISSING
    if cell == "unset":
        return None
    literal = re.fullmatch(r"`(.*)`", cell)
    assert literal, f"a default cell is `TOML`, unset or required, not {cell!r}"
    return tomllib.loads(f"v = {literal.group(1)}")["v"]


def code_default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return MISSING
    return list(value) if isinstance(value, tuple) else value
