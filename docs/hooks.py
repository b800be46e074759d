"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the manual that the code owns are
written from the code at build time, so they cannot drift from it.

- `<!-- flowd:openapi -->` in a page becomes the reference of every HTTP endpoint, rendered
  from `flowd.http.openapi.document()`: the document a daemon serves at `/openapi.json`.
- `<!-- flowd:include PATH -->` becomes the Markdown file PATH (relative to the repository),
  its headings one level down, so bench/README.md stays one file and is part of the site.

A marker that names nothing known fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flowd.http.openapi import document

__all__ = ["on_page_markdown", "render_openapi"]

ROOT = Path(__file__).resolve().parent.parent
_MARKER = re.compile(r"<!-- flowd:(\w+)(?: ([^ ]+))? -->")
_METHODS = ("get", "post", "put", "patch", "delete")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill every marker of the page."""
    return _MARKER.sub(lambda match: _fill(match.group(1), match.group(2), page), markdown)


def _fill(kind: str, argument: str | None, page: Any) -> str:
    if kind == "openapi" and argument is None:
        return render_openapi(document())
    if kind == "include" and argument:
        return _demoted((ROOT / argument).read_text(encoding="utf-8"))
    raise ValueError(f"{page.file.src_path}: unknown marker flowd:{kind} {argument or ''}")


def _demoted(text: str) -> str:
    """Headings one level down (outside code blocks): the included file's title becomes a
    section of the page that includes it."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(lines) + "\n"


def render_openapi(doc: dict[str, Any]) -> str:
    """The endpoints table, then one section per endpoint, then the schemas."""
    operations = [(path, method, op) for path, item in doc["paths"].items()
                  for method, op in item.items() if method in _METHODS]
    out = [f"Rendered from the OpenAPI {doc['openapi']} document of flowd "
           f"{doc['info']['version']}: {doc['info']['description']}", "",
           *_schemes(doc), "| method | path | what | token |", "| --- | --- | --- | --- |"]
    out += [f"| `{method.upper()}` | [`{path}`](#{_anchor(method, path)}) | "
            f"{_cell(op['summary'])} | {_security(op)} |" for path, method, op in operations]
    for path, method, op in operations:
        out += ["", f"### `{method.upper()} {path}` {{#{_anchor(method, path)}}}", "",
                _cell(op["summary"]) + ".", ""]
        if op.get("description"):
            out += [op["description"], ""]
        out += [f"Token: {_security(op)}.", ""]
        out += _parameters(op.get("parameters", []))
        out += _body(op.get("requestBody"))
        out += ["| status | when | answer |", "| --- | --- | --- |"]
        out += [f"| {status} | {_cell(answer['description'])} | {_answer(answer)} |"
                for status, answer in sorted(op["responses"].items())]
    out += ["", "### Schemas", ""]
    for name, schema in doc["components"]["schemas"].items():
        out += _schema(name, schema)
    return "\n".join(out) + "\n"


def _schemes(doc: dict[str, Any]) -> list[str]:
    """What each token named in the tables below is ("none": no token needed)."""
    schemes = doc.get("components", {}).get("securitySchemes", {})
    return [f"Token `{name}`: {scheme.get('scheme', scheme['type'])} — "
            f"{_cell(scheme.get('description', ''))}." for name, scheme in schemes.items()
            ] + ([""] if schemes else [])


def _anchor(method: str, path: str) -> str:
    return method + "-" + re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _security(op: dict[str, Any]) -> str:
    choices = op.get("security", [])
    names = [", ".join(f"`{name}`" for name in choice) or "none" for choice in choices]
    return " or ".join(names) or "none"


def _parameters(parameters: list[dict[str, Any]]) -> list[str]:
    if not parameters:
        return []
    rows = ["| parameter | in | required | type | what |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} | "
             f"{_type(p.get('schema', {}))} | {_cell(p.get('description', ''))} |"
             for p in parameters]
    return [*rows, ""]


def _body(body: dict[str, Any] | None) -> list[str]:
    if not body:
        return []
    kinds = [f"`{media}` ({_type(spec.get('schema', {}))})"
             for media, spec in body["content"].items()]
    required = "required" if body.get("required") else "optional"
    return [f"Body ({required}): {', or '.join(kinds)}.", ""]


def _answer(answer: dict[str, Any]) -> str:
    parts = [_type(spec.get("schema", {})) + f" (`{media}`)"
             for media, spec in answer.get("content", {}).items()]
    parts += [f"header `{name}`" for name in answer.get("headers", {})]
    return "; ".join(parts) or "—"


def _type(schema: dict[str, Any]) -> str:
    """A schema in a few words: a named schema links to its section."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    if "oneOf" in schema:
        return " or ".join(_type(choice) for choice in schema["oneOf"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        kind = f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        kind += " (" + ", ".join(f"`{value}`" for value in schema["enum"]) + ")"
    bounds = [f"{word} {schema[key]}" for key, word in (
        ("minimum", "≥"), ("maximum", "≤"), ("minLength", "length ≥"),
        ("maxLength", "length ≤"), ("minItems", "items ≥"), ("minProperties", "fields ≥"))
        if key in schema]
    if bounds:
        kind += " (" + ", ".join(bounds) + ")"
    return kind + (" or null" if schema.get("nullable") else "")


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"#### {name} {{#schema-{name.lower()}}}", ""]
    if schema.get("description"):
        out += [schema["description"], ""]
    properties = schema.get("properties", {})
    if not properties:
        extra = schema.get("additionalProperties")
        values = f": each value {_type(extra)}" if isinstance(extra, dict) else ""
        return [*out, f"{_type(schema)}{values}.", ""]
    required = set(schema.get("required", []))
    out += ["| field | type | required | what |", "| --- | --- | --- | --- |"]
    out += [f"| `{field}` | {_type(spec)} | {'yes' if field in required else 'no'} | "
            f"{_cell(spec.get('description', ''))} |" for field, spec in properties.items()]
    return [*out, ""]
