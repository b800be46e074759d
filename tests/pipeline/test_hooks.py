"""The stage-hook seam (flowd.pipeline.hooks): fault injection lives in the tests' tooling,
not in the product, and a subscriber is told only the stages it implements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowd.pipeline.hooks import StageHooks, install, installed

ROOT = Path(__file__).resolve().parents[2]


def test_no_product_module_reads_a_fault_injection_variable() -> None:
    readers = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "flowd").rglob("*.py"))
               if "FLOWD_FAULT" in path.read_text()]
    assert readers == []
    assert "FLOWD_FAULT_CRASH_AFTER_INSERT" in (ROOT / "scripts/faulty_flowd.py").read_text()


def test_each_subscriber_is_called_at_the_stages_it_implements_in_order() -> None:
    calls: list[tuple[str, Any]] = []

    class Counts:
        def after_commit(self, batch: Any) -> None:
            calls.append(("counts", batch))

    class Faults:
        def after_write(self, batch: Any) -> None:
            calls.append(("write", batch))

        def before_done(self, batch: Any, target: str) -> None:
            calls.append(("done", target))

        def after_commit(self, batch: Any) -> None:
            calls.append(("faults", batch))

    hooks = StageHooks([Counts(), Faults(), object()])
    hooks.after_write("b1")
    hooks.before_done("b1", "db.events")
    hooks.after_commit("b1")
    assert calls == [("write", "b1"), ("done", "db.events"), ("counts", "b1"),
                     ("faults", "b1")]


def test_an_installed_subscriber_reaches_flows_started_later_until_removed() -> None:
    subscriber = object()
    remove = install(subscriber)
    try:
        assert subscriber in installed()
    finally:
        remove()
    assert subscriber not in installed()
