"""The code's size stays readable: no module over 500 lines, no function over 50.

ruff holds complexity (C901) and statement counts (PLR0915) but has no rule for lines, so
this walks flowd/ and handlers/ with `ast`. A function may be longer only when its `def`
line says why, as `# shape: long — <reason>` (ruff would warn on an unknown `# noqa` code).
Run with `-s` to see the largest module and function, for a closing note.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (ROOT / "flowd", ROOT / "handlers")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 50
# The reason is required: an exception nobody explained is not an exception.
EXCEPTION = re.compile(r"#\s*shape:\s*long\s*[—-]+\s*\S")


def _modules() -> Iterator[Path]:
    for source in SOURCES:
        yield from sorted(source.rglob("*.py"))


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """From the `def` line to the last line of the body: decorators are not counted."""
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def _excused(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """The marker on the `def` line, or on the line closing a signature spread over
    several lines (where a formatter leaves a trailing comment)."""
    signature = lines[node.lineno - 1:node.body[0].lineno - 1] or [lines[node.lineno - 1]]
    return any(EXCEPTION.search(line) for line in signature)


def _measure() -> tuple[list[tuple[int, str]], list[tuple[int, str, bool]]]:
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str, bool]] = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        name = str(path.relative_to(ROOT))
        modules.append((len(lines), name))
        for node in _functions(ast.parse(text, filename=name)):
            functions.append((_length(node), f"{name}:{node.lineno} {node.name}",
                              _excused(lines, node)))
    return modules, functions


def test_modules_and_functions_stay_small() -> None:
    modules, functions = _measure()
    assert len(modules) > 50, "the walk found too few modules: is ROOT right?"
    too_long = [f"module {name}: {n} lines (max {MAX_MODULE_LINES})"
                for n, name in sorted(modules, reverse=True) if n > MAX_MODULE_LINES]
    too_long += [f"function {name}: {n} lines (max {MAX_FUNCTION_LINES})"
                 for n, name, excused in sorted(functions, reverse=True)
                 if n > MAX_FUNCTION_LINES and not excused]
    print(f"\nlargest module: {max(modules)[1]} ({max(modules)[0]} lines)")
    longest = max(functions)
    print(f"largest function: {longest[1]} ({longest[0]} lines"
          f"{', excused on its def line' if longest[2] else ''})")
    assert not too_long, "split these into well-named parts:\n" + "\n".join(too_long)


def test_an_exception_needs_its_reason() -> None:
    """The check itself: the marker excuses a function only with a reason after it."""
    source = ("def f(\n    x,\n):  # shape: long — a measured fast path\n    return x\n"
              "def g():  # shape: long\n    return 1\n")
    f, g = ast.parse(source).body
    assert isinstance(f, ast.FunctionDef) and isinstance(g, ast.FunctionDef)
    assert _excused(source.splitlines(), f)
    assert not _excused(source.splitlines(), g)
