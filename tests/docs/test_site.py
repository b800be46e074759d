"""The manual as a site: `mkdocs build --strict` passes (a broken link or anchor, or a page
left out of the nav, fails it), the HTTP API page holds every endpoint of the OpenAPI
document the daemon serves, and the code layout page names every module there is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from flowd.http.openapi import document

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def build(site: Path, mkdocs_yml: Path = ROOT / "mkdocs.yml") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "--config-file", str(mkdocs_yml), "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_strict_with_every_endpoint_of_the_openapi_document(
        tmp_path: Path) -> None:
    done = build(tmp_path / "site")
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "site" / "http-api" / "index.html").read_text()
    endpoints = [f"{method.upper()} {path}" for path, item in document()["paths"].items()
                 for method in item]
    missing = [e for e in endpoints if f"<code>{e}</code>" not in page]
    assert endpoints and missing == [], missing
    benchmarks = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "Results on this machine" in benchmarks  # bench/README.md, included


def test_a_page_left_out_of_the_nav_fails_the_build(tmp_path: Path) -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    left_out = config.replace("\n  - Code layout: layout.md", "")
    assert left_out != config
    # The same site from a copy of mkdocs.yml elsewhere: its paths made absolute.
    left_out = left_out.replace("docs_dir: docs", f"docs_dir: {DOCS}").replace(
        "  - docs/hooks.py", f"  - {DOCS / 'hooks.py'}")
    mkdocs_yml = tmp_path / "mkdocs.yml"
    mkdocs_yml.write_text(left_out)
    done = build(tmp_path / "site", mkdocs_yml)
    assert done.returncode == 1, done.stderr
    assert "layout.md" in done.stderr and "not included in the \"nav\"" in done.stderr


def test_the_layout_page_names_every_module_and_only_modules_that_exist() -> None:
    layout = (DOCS / "layout.md").read_text()
    modules = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "flowd").rglob("*.py")
                     if path.name != "__init__.py" or path.parent == ROOT / "flowd")
    packages = sorted(str(path.parent.relative_to(ROOT)) + "/"
                      for path in (ROOT / "flowd").glob("*/__init__.py"))
    assert [m for m in modules + packages if f"`{m}`" not in layout] == []
    named = re.findall(r"`(flowd/[\w/.]*)`", layout)
    assert [name for name in named if not (ROOT / name).exists()] == []
