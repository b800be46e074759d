"""The shape of the package, checked: no module of flowd imports itself back through others
(an import loop inside a subpackage is invisible to the layers contracts of `lint-imports`),
and every `from flowd.x import name` takes `name` from the module that defines it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flowd"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import loops of `graph`: one shortest loop per strongly connected group of
    modules that import each other (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            module, imported = work[-1]
            for other in imported:
                if other not in index:
                    index[other] = low[other] = len(index)
                    stack.append(other)
                    on_stack.add(other)
                    work.append(
                        (other, iter(sorted(graph.find_modules_directly_imported_by(other)))))
                    break
                if other in on_stack:
                    low[module] = min(low[module], index[other])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == module:
                            break
                    if len(group) > 1:
                        groups.append(group)
    return [_loop_through(graph, sorted(group)[0], group) for group in groups]


def _loop_through(graph: grimp.ImportGraph, module: str, group: set[str]) -> list[str]:
    shortest: list[str] = []
    for imported in graph.find_modules_directly_imported_by(module):
        if imported in group:
            chain = list(graph.find_shortest_chain(importer=imported, imported=module) or ())
            if chain and (not shortest or len(chain) < len(shortest)):
                shortest = chain
    return [module, *shortest]


def test_no_module_of_flowd_is_in_an_import_loop() -> None:
    # Every import counts: at module level, in a function, under TYPE_CHECKING.
    graph = grimp.build_graph("flowd", include_external_packages=False, cache_dir=None)
    loops = _cycles(graph)
    assert not loops, "import loops:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_the_loop_finder_finds_a_loop() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c", "p.d"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    graph.add_import(importer="p.c", imported="p.d")
    assert _cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]


# -- names imported from where they are defined ------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements run at import time, into `if`/`try`/`with` blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.With):
            yield from _top_level(node.body)
            yield from _top_level(getattr(node, "orelse", []))
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(handler.body for handler in node.handlers)):
                yield from _top_level(block)


def _names_defined(tree: ast.Module) -> set[str]:
    """What a module defines itself: assigned, def, class — not what it imports."""
    names: set[str] = set()
    for node in _top_level(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _facade(name: str, path: Path, tree: ast.Module) -> set[str]:
    """What a package's `__init__` hands on from its own submodules: its public face (as
    flowd.core.config is for config/model.py...), the one re-export allowed below `flowd`."""
    if path.name != "__init__.py":
        return set()
    return {alias.asname or alias.name for node in _top_level(tree.body)
            if isinstance(node, ast.ImportFrom) and not node.level and node.module
            and node.module.startswith(f"{name}.") for alias in node.names}


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def misplaced_imports(modules: dict[str, Path]) -> list[str]:
    """Every `from flowd.x import name` in `modules` where flowd.x neither defines `name`
    nor has it as a submodule; the top-level package's public re-exports are allowed."""
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    defined = {name: _names_defined(tree) | _facade(name, modules[name], tree)
               for name, tree in trees.items()}
    found = []
    for importer, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            source = node.module
            if source not in modules or source == "flowd":
                continue
            for alias in node.names:
                if alias.name not in defined[source] and f"{source}.{alias.name}" not in modules:
                    found.append(f"{importer}:{node.lineno}: "
                                 f"{alias.name} from {source}, which does not define it")
    return found


def test_names_are_imported_from_the_module_that_defines_them() -> None:
    found = misplaced_imports(_modules())
    assert not found, "\n".join(found)


def test_all_lists_only_what_the_module_defines() -> None:
    # A name in `__all__` that the module only imports invites importing it from there;
    # the top-level package is the one place that re-exports (the public API).
    modules = _modules()
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        defined = _names_defined(tree) | _facade(name, path, tree)
        for node in _top_level(tree.body):
            if isinstance(node, ast.Assign) and name != "flowd" and any(
                    isinstance(target, ast.Name) and target.id == "__all__"
                    for target in node.targets):
                found += [f"{name}: {listed}" for listed in ast.literal_eval(node.value)
                          if listed not in defined and f"{name}.{listed}" not in modules]
    assert not found, "listed in __all__ but not defined there:\n" + "\n".join(found)


def test_a_name_taken_from_a_module_that_only_imports_it_is_found(tmp_path: Path) -> None:
    modules = {"flowd.a": tmp_path / "a.py", "flowd.b": tmp_path / "b.py",
               "flowd.c": tmp_path / "c.py"}
    modules["flowd.a"].write_text("X = 1\ndef f(): pass\n")
    modules["flowd.b"].write_text("from flowd.a import X, f\n")
    modules["flowd.c"].write_text("from flowd.a import f\nfrom flowd.b import X\n")
    assert [line.split(": ", 1)[1] for line in misplaced_imports(modules)] == [
        "X from flowd.b, which does not define it"]
