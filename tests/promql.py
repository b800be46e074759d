"""PromQL as the ops tests read it: the metric names (and label matchers) an expression
selects, and a /metrics answer to check them against."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# Names a query may use that no flowd daemon exports, each with the reason.
NOT_FLOWD = {
    # Prometheus's own series, one per scrape target (1: the last scrape succeeded): the
    # only way to see a daemon that does not answer at all. No exporter serves it.
    "up",
}
# Labels Prometheus adds to every series it scrapes (the daemon does not serve them).
TARGET_LABELS = {"job", "instance"}


# -- PromQL: the metric names (and their label matchers) an expression selects ------------

def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Prometheus 2.x functions and aggregation operators; Grafana's template functions are
# handled apart (variable_query_selectors). A call of anything else is an error: a
# misspelled function must not pass for a metric name, nor go unnoticed.
PROMQL_FUNCTIONS = _words("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv end exp floor histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta
    increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
    max_over_time min_over_time minute month pi predict_linear present_over_time
    quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
    sort_by_label_desc sort_desc sqrt start stddev_over_time stdvar_over_time sum_over_time
    tan tanh time timestamp vector year
    avg bottomk count count_values group limit_ratio limitk max min quantile stddev stdvar sum
    topk
""")
PROMQL_KEYWORDS = _words(
    "and or unless atan2 by without on ignoring group_left group_right offset bool inf nan")
_GROUPING = _words("by without on ignoring group_left group_right")

_TOKEN = re.compile(r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{[^}]*\}|\$\w+)
    | (?P<number>(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)
    | (?P<name>[A-Za-z_:][\w:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){}\[\],@:])
    | (?P<space>\s+)
""", re.VERBOSE)


def strip_strings(expr: str) -> str:
    """`expr` without its string literals."""
    return _TOKEN.sub(lambda m: "" if m.lastgroup == "string" else m.group(), expr)


@dataclass
class Selector:
    """A metric selector: `name{label op "value", ...}`."""

    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r} in {expr!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def _unquote(text: str) -> str:
    return text[1:-1] if text[0] == "`" else \
        re.sub(r"\\(.)", r"\1", text[1:-1])


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of a PromQL expression: string literals, label matchers, range
    and subquery durations, `by (...)`/`on (...)`-like clauses, Grafana's `$variables`,
    numbers, keywords and function names are not metric names. Raises ValueError on a call
    of a function PromQL does not have."""
    tokens = _tokens(expr)
    found: list[Selector] = []
    i = 0

    def skip_group(start: int, opening: str, closing: str) -> int:
        depth = 0
        for j in range(start, len(tokens)):
            depth += (tokens[j][1] == opening) - (tokens[j][1] == closing)
            if depth == 0:
                return j + 1
        raise ValueError(f"unbalanced {opening!r} in {expr!r}")

    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "[":  # a range or subquery: durations and variables only
            i = skip_group(i, "[", "]")
            continue
        if kind == "name" and text in _GROUPING and following == "(":
            i = skip_group(i + 1, "(", ")")  # label names
            continue
        if kind == "name" and text.lower() in PROMQL_KEYWORDS:
            i += 1
            continue
        if kind == "name" and (following == "(" or following in ("by", "without")):
            # a call, or an aggregation with its grouping first: `sum by (flow) (...)`
            if text not in PROMQL_FUNCTIONS:
                raise ValueError(f"{text!r} is not a PromQL function (in {expr!r})")
            i += 1
            continue
        if kind == "name" or text == "{":
            selector = Selector(text if kind == "name" else "")
            i += 1 if kind == "name" else 0
            if i < len(tokens) and tokens[i][1] == "{":
                end = skip_group(i, "{", "}")
                selector.matchers = _matchers(tokens[i + 1:end - 1], expr)
                i = end
            if not selector.name:  # {__name__="..."}
                names = [v for label, op, v in selector.matchers if label == "__name__"]
                if len(names) != 1:
                    raise ValueError(f"a selector without a metric name in {expr!r}")
                selector.name = names[0]
            found.append(selector)
            continue
        i += 1
    return found


def _matchers(tokens: list[tuple[str, str]], expr: str) -> list[tuple[str, str, str]]:
    matchers = []
    for start in range(0, len(tokens), 4):  # label op "value" [,]
        part = tokens[start:start + 3]
        if len(part) != 3 or part[0][0] != "name" or part[2][0] != "string" or \
                part[1][1] not in ("=", "!=", "=~", "!~"):
            raise ValueError(f"cannot read the label matchers of {expr!r}")
        matchers.append((part[0][1], part[1][1], _unquote(part[2][1])))
    return matchers


def variable_query_selectors(query: str) -> list[Selector]:
    """A Grafana variable query: `label_values(SELECTOR, label)` (the metric is in
    SELECTOR), `label_values(label)` (none), or `query_result(PROMQL)`."""
    if match := re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", query):
        return selectors(match.group(1))
    if re.fullmatch(r"\s*label_values\(\s*[A-Za-z_]\w*\s*\)\s*", query):
        return []
    if match := re.fullmatch(r"\s*query_result\((.*)\)\s*", query):
        return selectors(match.group(1))
    raise ValueError(f"a variable query this test cannot read: {query!r}")


def names(expr: str) -> set[str]:
    return {selector.name for selector in selectors(expr)}


# -- what the files hold ---------------------------------------------------------------


# -- a /metrics answer ---------------------------------------------------------------------

_SUFFIXES = {"_total": ("counter",), "_created": ("counter", "histogram", "summary"),
             "_bucket": ("histogram",), "_sum": ("histogram", "summary"),
             "_count": ("histogram", "summary")}


class Exposition:
    """One /metrics answer, read by prometheus-client's own parser: its families, and the
    labels of every sample by sample name."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[dict[str, str]]] = {}
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append(sample.labels)
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def family_of(self, name: str) -> str | None:
        """The family a series name belongs to: itself (a gauge), or the family its
        _total/_bucket/_sum/_count suffix belongs to, when the family has that type."""
        if name in self.types and self.types[name] not in ("counter", "histogram", "summary"):
            return name
        for suffix, kinds in _SUFFIXES.items():
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) in kinds:
                return base
        return None

    def problems(self, selector: Selector) -> list[str]:
        """What is wrong with a selector on this answer (nothing: it selects series)."""
        if selector.name in NOT_FLOWD:
            return []
        if self.family_of(selector.name) is None:
            return [f"{selector.name}: no such metric (families: {sorted(self.types)})"]
        labelled = self.samples.get(selector.name, [])
        if not labelled:
            return [f"{selector.name}: its family {self.family_of(selector.name)} has no "
                    f"sample of that name"]
        wrong = []
        for label, op, value in selector.matchers:
            if label in TARGET_LABELS:
                continue
            values = {labels[label] for labels in labelled if label in labels}
            if not values:
                wrong.append(f"{selector.name}: no label {label!r} "
                             f"(it has {sorted({k for s in labelled for k in s})})")
            elif op == "=" and value not in values:
                wrong.append(f"{selector.name}{{{label}={value!r}}}: no such value "
                             f"(it has {sorted(values)})")
        return wrong
