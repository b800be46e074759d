"""The README as the front door: short, its test command the one CI runs, every link and
path it or the manual names there to follow, and its example a handler that works."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flowd.testing import flow_from_toml, run_handler

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_the_readme_is_at_most_200_lines_and_gives_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^exec (\S+)$", ci, re.MULTILINE)
    assert command, "the command .ci/run runs"
    shell = fenced(text, "sh")
    assert f"{command.group(1)}\n" in shell  # the test command is the one CI runs
    assert "scripts/quickstart.sh            # takes --count N and --dir DIR\n" in shell


def test_every_relative_link_of_the_readme_and_the_manual_leads_to_a_file() -> None:
    broken = []
    for page in [README, *PAGES]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_every_path_the_readme_and_the_manual_name_exists() -> None:
    """Module and script paths, so a move leaves no stale name behind. A test file may
    move into a folder of tests/: its name must still be a test file somewhere there."""
    tests = {path.name for path in (ROOT / "tests").rglob("test_*.py")}
    stale = []
    for page in [README, *PAGES]:
        for path in re.findall(r"`((?:flowd|handlers|scripts|ops|bench|tests)/[\w/.*-]*)`",
                               page.read_text()):
            if "*" in path or (ROOT / path).exists():
                continue
            if path.startswith("tests/") and Path(path).name in tests:
                continue
            stale.append(f"{page.relative_to(ROOT)}: {path}")
    assert stale == []


def test_the_readme_example_handler_routes_as_its_config_says() -> None:
    text = README.read_text()
    example = text[text.index("## An example"):]
    config, handler = fenced(example, "toml")[0], fenced(example, "python")[0]
    namespace: dict[str, Any] = {}
    exec(compile(handler, "README.md", "exec"), namespace)
    items = [{"sku": f"s{i}", "qty": i} for i in range(12)]
    messages = [{"data": '{"id": 7, "items": [{"sku": "a", "qty": 2}]}'},
                {"data": '{"id": 8, "items": ' + str(items).replace("'", '"') + "}"},
                {"data": "not json"}]
    result = run_handler(namespace["order_lines"], messages, flow=flow_from_toml(config),
                         tables={"order_lines": [
                             ("order_id", "UInt64"), ("line", "UInt32"), ("size", "String"),
                             ("sku", "String"), ("qty", "UInt32")]})

    assert result.rows["order_lines"][0] == {
        "order_id": 7, "line": 0, "size": "small", "sku": "a", "qty": 2}
    assert len(result.rows["order_lines"]) == 13
    assert [r["line"] for r in result.streams["shop.large"]] == [str(i) for i in range(12)]
    assert [(d.index, d.reason.split(":")[0]) for d in result.dead_letters] == [
        (2, "not an order")]
