"""ops/: the Grafana dashboard and the Prometheus alert rules.

- The rules pass `promtool check rules`, and their unit tests (`promtool test rules`) pass;
  those unit tests fail when an alert is gone, fires without its `for:`, or loses the clause
  that spares a paused flow (so they do test what they claim).
- The dashboard parses, every panel has a query, and every query (the variables' too) is
  PromQL that promtool accepts.
- Every metric name in the dashboard and the rules, with its label names and `=` values,
  exists in the live /metrics of a real `flowd run` that moved entries (dead letters, an
  HTTP ingest, a [[source]] and a [[move]] included); and every dashboard query returns
  data on those very series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import servers
import yaml
from clickhouse_driver import Client
from conftest import ROOT, TEST_DB
from prometheus_client.parser import text_string_to_metric_families
from promql import Exposition, Selector, names, selectors, strip_strings, variable_query_selectors
from shared import STREAM, get, post, row_count
from support import Flowd, all_acked, hub_entry, produce, wait_for

RULES = ROOT / "ops" / "prometheus" / "flowd-rules.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "flowd-rules.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "flowd.json"

def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in panels(dashboard) if panel["type"] not in ("row", "text")]


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [(f"panel {panel['id']} {panel['title']!r} target {target['refId']}",
             target["expr"])
            for panel in query_panels(dashboard) for target in panel["targets"]]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"variable {var['name']}", var["definition"])
            for var in dashboard["templating"]["list"] if var["type"] == "query"]


def rule_queries() -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
            for rule in load_rules()]


def annotation_names() -> set[str]:
    """flowd_* names the alerts' annotations mention (the queries their templates run, and
    names the text gives the reader): they must exist too."""
    text = " ".join(str(value) for rule in alerts()
                    for value in rule.get("annotations", {}).values())
    return set(re.findall(r"\bflowd_[a-z_]*[a-z]", text))


def all_selectors() -> list[tuple[str, Selector]]:
    dashboard = load_dashboard()
    found = [(where, selector) for where, expr in [*dashboard_queries(dashboard),
                                                   *rule_queries()]
             for selector in selectors(expr)]
    found += [(where, selector) for where, query in variable_queries(dashboard)
              for selector in variable_query_selectors(query)]
    found += [("annotations", Selector(name)) for name in sorted(annotation_names())]
    return found


# A few lines as a daemon serves them: the checker's own test needs no daemon.
SAMPLE_EXPOSITION = """\
# HELP flowd_entries_acked_total Entries acknowledged.
# TYPE flowd_entries_acked_total counter
flowd_entries_acked_total{flow="f",stream="s",server="default"} 5.0
# HELP flowd_lag Lag.
# TYPE flowd_lag gauge
flowd_lag{flow="f",stream="s",server="default"} 0.0
# HELP flowd_batch_duration_seconds Batch time.
# TYPE flowd_batch_duration_seconds histogram
flowd_batch_duration_seconds_bucket{flow="f",stream="s",server="default",le="+Inf"} 1.0
flowd_batch_duration_seconds_count{flow="f",stream="s",server="default"} 1.0
flowd_batch_duration_seconds_sum{flow="f",stream="s",server="default"} 0.1
# HELP flowd_registry_daemons Daemons.
# TYPE flowd_registry_daemons gauge
flowd_registry_daemons{state="live"} 1.0
flowd_registry_daemons{state="gone"} 0.0
"""


def test_the_extractor_finds_the_metric_names_and_the_checker_flags_unknown_ones() -> None:
    expr = ('sum by (le, flow) (rate(flowd_batch_duration_seconds_bucket{job=~"$job", '
            'stream=~"{s}|s"}[$__rate_interval])) / on (instance) group_left '
            'flowd_lag offset 5m > bool 0 unless absent(flowd_registry_daemons{state="gone"})'
            ' or max_over_time(flowd_entries_acked_total[1h:5m]) * -1.5e3 or up == 0')
    found = selectors(expr)
    assert [s.name for s in found] == [
        "flowd_batch_duration_seconds_bucket", "flowd_lag", "flowd_registry_daemons",
        "flowd_entries_acked_total", "up"]
    assert found[0].matchers == [("job", "=~", "$job"), ("stream", "=~", "{s}|s")]
    assert names('{__name__="flowd_lag", flow="f"}') == {"flowd_lag"}
    assert [s.name for s in variable_query_selectors(
        'label_values(flowd_lag{job=~"$job"}, flow)')] == ["flowd_lag"]
    assert variable_query_selectors("label_values(job)") == []
    with pytest.raises(ValueError, match="'rat' is not a PromQL function"):
        selectors("rat(flowd_lag[5m])")

    scrape = Exposition(SAMPLE_EXPOSITION)
    assert scrape.family_of("flowd_entries_acked_total") == "flowd_entries_acked"
    assert scrape.family_of("flowd_batch_duration_seconds_bucket") == \
        "flowd_batch_duration_seconds"
    for selector in found:
        assert scrape.problems(selector) == [], selector
    # A misspelling; the family name, which Prometheus has no series of; a suffix its type
    # does not have; a label it does not have; a label value it never takes.
    for wrong in ("flowd_entries_akced_total", "flowd_entries_acked", "flowd_lag_total",
                  "flowd_entries_acked_bucket", 'flowd_lag{flwo="f"}',
                  'flowd_registry_daemons{state="dead"}'):
        (selector,) = selectors(wrong)
        assert scrape.problems(selector), wrong


# -- promtool ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def promtool() -> str:
    return servers.ensure_promtool_installed()


def run_promtool(promtool: str, *args: str | Path, cwd: Path | None = None,
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_promtool_check_rules_passes(promtool: str) -> None:
    done = run_promtool(promtool, "check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in done.stdout


def test_every_alert_has_for_a_severity_and_annotations_naming_what_fires() -> None:
    found = alerts()
    assert {rule["alert"] for rule in found} >= {
        "FlowdLagGrowing", "FlowdPendingStuck", "FlowdDeadLettersRising", "FlowdDaemonDown",
        "FlowdNoDaemonReporting", "FlowdDaemonGone", "FlowdUnhealthy"}
    for rule in found:
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert summary.strip() and description.strip(), rule["alert"]
        # What fires is named in the text (the unit tests check the rendered text of each);
        # absent() has no labels but the job it looks for, which the description names.
        if not rule["expr"].startswith("absent("):
            assert "{{ $labels." in summary + description, rule["alert"]


def test_promtool_test_rules_passes(promtool: str) -> None:
    done = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _mutated_rules_fail(promtool: str, tmp_path: Path,
                        mutate: Callable[[dict[str, Any]], bool]) -> tuple[bool, str]:
    """Write the rules with `mutate` applied to each rule (it says whether it changed one)
    beside a copy of the unit tests; (whether promtool test rules failed, its output)."""
    document = yaml.safe_load(RULES.read_text())
    changed = [mutate(rule) for group in document["groups"] for rule in group["rules"]]
    assert any(changed), "the mutation changed nothing"
    work = tmp_path / f"mutant-{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    (work / RULES.name).write_text(yaml.safe_dump(document, sort_keys=False))
    shutil.copy(RULE_TESTS, work / RULE_TESTS.name)
    check = run_promtool(promtool, "check", "rules", work / RULES.name)
    assert check.returncode == 0, check.stdout + check.stderr  # still valid rules
    done = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=work)
    return done.returncode != 0, done.stdout + done.stderr


@pytest.mark.parametrize("alert", [rule["alert"] for rule in alerts()])
def test_the_unit_tests_see_each_alert_fire_and_wait_for_its_for(
        promtool: str, tmp_path: Path, alert: str) -> None:
    def rename(rule: dict[str, Any]) -> bool:
        if rule.get("alert") != alert:
            return False
        rule["alert"] = alert + "Renamed"
        return True

    def no_for(rule: dict[str, Any]) -> bool:
        if rule.get("alert") != alert:
            return False
        rule["for"] = "0s"
        return True

    failed, output = _mutated_rules_fail(promtool, tmp_path, rename)
    assert failed, f"no unit test expects {alert} to fire:\n{output}"
    assert f"alertname: {alert}," in output
    failed, output = _mutated_rules_fail(promtool, tmp_path, no_for)
    assert failed, f"no unit test checks that {alert} waits for its `for:`:\n{output}"


def test_the_unit_tests_see_a_paused_flow_spared(promtool: str, tmp_path: Path) -> None:
    spared = [rule["alert"] for rule in alerts() if "unless" in rule["expr"]]
    assert len(spared) >= 3
    for alert in spared:
        def drop_unless(rule: dict[str, Any], alert: str = alert) -> bool:
            if rule.get("alert") != alert:
                return False
            rule["expr"] = rule["expr"].split("unless")[0].strip()
            return True

        failed, output = _mutated_rules_fail(promtool, tmp_path, drop_unless)
        assert failed, f"no unit test has a paused flow that {alert} must spare:\n{output}"
        assert 'flow="paused"' in output, output


# -- the dashboard ---------------------------------------------------------------------------

def test_the_dashboard_parses_and_every_panel_has_a_query_on_the_templated_datasource(
        ) -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "flowd" and dashboard["title"]
    (ds_input,) = dashboard["__inputs"]
    assert (ds_input["name"], ds_input["type"], ds_input["pluginId"]) == \
        ("DS_PROMETHEUS", "datasource", "prometheus")
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == \
        ("datasource", "prometheus")
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    assert {"job", "instance", "flow"} <= variables.keys()
    source = {"type": "prometheus", "uid": "${datasource}"}

    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    shown = query_panels(dashboard)
    assert len(shown) >= 20
    for panel in shown:
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == source, where
        assert panel["targets"], f"{where} has no query"
        assert panel["gridPos"]["w"] > 0 and panel["gridPos"]["h"] > 0, where
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == source, where
            assert target["expr"].strip() and names(target["expr"]), f"{where}: no metric"
    for var in ("job", "instance", "flow"):
        assert variables[var]["datasource"] == source
        assert variables[var]["query"]["query"] == variables[var]["definition"]
        assert variables[var]["includeAll"] and variables[var]["allValue"] == ".*"
    # Every panel query follows the job and instance variables; every per-flow one the flow.
    for where, expr in dashboard_queries(dashboard):
        for selector in selectors(expr):
            labels = {label: value for label, _, value in selector.matchers}
            assert labels.get("job") == "$job" and labels.get("instance") == "$instance", \
                f"{where}: {selector.name} ignores $job or $instance"
            if selector.name.startswith(("flowd_lag", "flowd_pending", "flowd_entries",
                                         "flowd_rows", "flowd_batch", "flowd_flow_state")):
                assert labels.get("flow") == "$flow", f"{where}: {selector.name} ignores $flow"
    # What the issue asks the dashboard to show.
    used = {selector.name for _, selector in all_selectors()}
    assert used >= {
        "flowd_lag", "flowd_pending", "flowd_oldest_pending_idle_seconds",
        "flowd_entries_acked_total", "flowd_rows_inserted_total", "flowd_dead_letter_length",
        "flowd_entries_dead_lettered_total", "flowd_batch_duration_seconds_bucket",
        "flowd_batch_failures_total", "flowd_flow_state", "flowd_http_requests_total",
        "flowd_healthy", "flowd_registry_daemons"}
    assert any(expr.startswith("histogram_quantile(")
               and "flowd_batch_duration_seconds_bucket" in expr
               for _, expr in dashboard_queries(dashboard))


GRAFANA_DURATIONS = {"$__rate_interval": "5m", "${__rate_interval}": "5m",
                     "$__interval": "1m", "${__interval}": "1m", "$__range": "1h"}


def as_promql(expr: str, chosen: dict[str, str] | None = None) -> str:
    """A Grafana query as plain PromQL: its interval variables replaced by durations, and
    the dashboard's variables by the `chosen` values (left as they are, they only appear
    inside label-matcher strings, which stay valid PromQL)."""
    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    for variable, chosen_value in (chosen or {}).items():
        expr = re.sub(rf"\$(?:{variable}\b|\{{{variable}\}})", chosen_value, expr)
    assert "$" not in strip_strings(expr), f"a Grafana variable outside a string: {expr}"
    return expr


def _selector_text(selector: Selector) -> str:
    matchers = ", ".join(f"{label}{op}{json.dumps(value)}"
                         for label, op, value in selector.matchers)
    return f"{selector.name}{{{matchers}}}" if matchers else selector.name


def dashboard_rule_file(dashboard: dict[str, Any], kind: str,
                        chosen: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Every dashboard query as a rule (recording: `kind` "record"; an alert on the query
    returning anything: "alert"), for promtool, with the variables' `chosen` values; the
    text and rule name → where."""
    rules, where_of = [], {}
    queries = [*dashboard_queries(dashboard),
               *((where, " or ".join(_selector_text(s) for s in variable_query_selectors(query)))
                 for where, query in variable_queries(dashboard))]
    for n, (where, expr) in enumerate(queries):
        name = f"dashboard_query_{n}"
        where_of[name] = where
        if kind == "record":
            rules.append({"record": name, "expr": as_promql(expr, chosen)})
        else:
            rules.append({"alert": name, "expr": f"count({as_promql(expr, chosen)}) > 0"})
    return yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), where_of


def test_every_dashboard_query_is_promql_that_promtool_accepts(
        promtool: str, tmp_path: Path) -> None:
    text, where_of = dashboard_rule_file(load_dashboard(), "record")
    (tmp_path / "dashboard.yml").write_text(text)
    done = run_promtool(promtool, "check", "rules", tmp_path / "dashboard.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(where_of)} rules found" in done.stdout


# -- a live daemon ----------------------------------------------------------------------------

DEAD = "BUFF.demo.dead"
FLOW = f"""
    [[flow]]
    name = "ingest"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    batch = 100
    flush_ms = 20
    dead_letter = "{DEAD}"

      [[flow.to]]
      clickhouse = "events"

    [[source]]
    name = "orders"
    clickhouse = "ops_orders"
    cursor = ["id"]
    every = "200ms"
      [[source.to]]
      stream = "ops.orders"

    [[move]]
    name = "old"
    table = "ops_old"
    to = {{ clickhouse = "ops_old", server = "cold" }}
    older_than = "30d"
    via = "ops.old"
    every = "200ms"
"""
OLD = f"""CREATE TABLE {TEST_DB}.ops_old (ts DateTime, id UInt64) ENGINE = MergeTree
          PARTITION BY toYYYYMM(ts) ORDER BY id"""


def value(exposition_text: str, name: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(exposition_text):
        total += sum(s.value for s in family.samples if s.name == name)
    return total


@pytest.fixture
def live(r: redis.Redis, ch: Client, cold: Client, cold_server: servers.Server,
         events_table: str, write_config: Callable[..., Path],
         start_flowd: Callable[..., Flowd]) -> Iterator[str]:
    """The /metrics text of a real daemon whose flow moved entries read from Redis and
    posted over HTTP, dead-lettered some, and whose registry knows it."""
    good, bad, posted = 300, 3, 20
    ch.execute(f"CREATE TABLE {TEST_DB}.ops_orders (id UInt64) ENGINE = MergeTree ORDER BY id")
    ch.execute(f"INSERT INTO {TEST_DB}.ops_orders SELECT number FROM system.numbers LIMIT 5")
    ch.execute(OLD)
    cold.execute(OLD)
    ch.execute(f"INSERT INTO {TEST_DB}.ops_old SELECT toDateTime('2025-01-01 00:00:00'), 1")
    produce(r, STREAM, [hub_entry(i) for i in range(good)])
    produce(r, STREAM, [{**hub_entry(good + i), "data": "not json"} for i in range(bad)])
    port = servers.free_port()
    flowd = start_flowd(write_config(textwrap.dedent(f"""
        [http]
        listen = "127.0.0.1:{port}"

        [clickhouse.cold]
        host = "{cold_server.host}"
        port = {cold_server.port}
        database = "{TEST_DB}"
        """) + FLOW, metrics=f"127.0.0.1:{port}"))
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="/healthz 200 after the start")
    status, answer, _ = post(port, STREAM, json.dumps(
        [hub_entry(good + bad + i) for i in range(posted)]))
    assert (status, answer.get("written")) == (200, posted), answer
    total = good + bad + posted
    wait_for(lambda: all_acked(r, STREAM, "flowd", total), timeout=90, what="all acked")

    def settled() -> str | None:
        status, body = get(port, "/metrics")
        if status != 200:
            return None
        exposition = Exposition(body)
        # Every entry, and the one row the move sent through its own flow.
        counted = value(body, "flowd_entries_acked_total") == total + 1
        registered = exposition.values.get(("flowd_registry_daemons", (("state", "live"),)))
        # The source caught up once: its lag is served from then on.
        caught_up = ("flowd_source_lag_seconds", (("source", "orders"),)) in exposition.values
        moved = exposition.values.get(("flowd_move_partitions_moved_total",
                                       (("move", "old"),))) == 1
        return body if counted and registered == 1 and caught_up and moved else None

    body = wait_for(settled, timeout=60,
                    what="a scrape counting every entry, and this daemon live in the registry")
    assert row_count(ch) == good + posted
    assert value(body, "flowd_entries_dead_lettered_total") == bad == r.xlen(DEAD)
    assert value(body, "flowd_dead_letter_length") == bad
    assert value(body, "flowd_http_request_seconds_count") >= 1
    yield body
    assert flowd.terminate() == 0


def test_every_metric_in_the_dashboard_and_the_rules_is_in_a_live_metrics(live: str) -> None:
    exposition = Exposition(live)
    used = all_selectors()
    assert len(used) > 40
    problems = sorted({f"{where}: {problem}" for where, selector in used
                       for problem in exposition.problems(selector)})
    assert problems == [], "\n".join(problems)
    # Every family of ours the daemon serves is on the dashboard (a new metric gets a panel).
    shown = {exposition.family_of(s.name) for where, s in used if where.startswith("panel")}
    served = {name for name in exposition.types if name.startswith("flowd_")
              # prometheus-client's creation time of a counter or histogram: not a figure
              and name.removesuffix("_created") not in exposition.types}
    assert served - shown == set()
    # And the checker, on this very answer, flags what is not there.
    for wrong in ("flowd_entries_akced_total", "flowd_entries_acked", "flowd_lags",
                  'flowd_flow_state{state="stopped"}', 'flowd_http_requests_total{path="/"}'):
        (selector,) = selectors(wrong)
        assert exposition.problems(selector), wrong


def input_series(exposition: Exposition, points: int) -> list[dict[str, str]]:
    """The live samples as promtool input series of two daemons of job flowd: counters
    (and histogram parts) rising by 1 a minute, gauges as served, steady."""
    series = []
    for name, labelled in exposition.samples.items():
        family = exposition.family_of(name)
        rising = family is not None and family != name
        for labels in labelled:
            for instance in ("a:9464", "b:9464"):
                text = ",".join(f"{k}={json.dumps(v)}" for k, v in
                                sorted({**labels, "job": "flowd", "instance": instance}.items()))
                start = 0.0 if rising else \
                    exposition.values[(name, tuple(sorted(labels.items())))]
                series.append({"series": f"{name}{{{text}}}",
                               "values": f"{start:f}+1x{points}" if rising else
                               f"{start:f}x{points}"})
    return series


# Panels that show nothing on a healthy daemon, by design.
EMPTY_WHEN_HEALTHY = {"Failing health checks"}


def test_every_dashboard_query_returns_data_on_the_live_series(
        live: str, promtool: str, tmp_path: Path) -> None:
    """The dashboard's queries, run by Prometheus's own engine (promtool) over the live
    daemon's series: each returns something, so no label value, `by` or ratio in it is
    off."""
    exposition = Exposition(live)
    dashboard = load_dashboard()
    # The variables set as a user would pick them: one job, one daemon, one flow.
    text, where_of = dashboard_rule_file(
        dashboard, "alert", {"job": "flowd", "instance": "b:9464", "flow": "ingest"})
    (tmp_path / "dashboard.yml").write_text(text)
    expected = [name for name, where in where_of.items()
                if not any(f"{title!r}" in where for title in EMPTY_WHEN_HEALTHY)]
    assert len(expected) < len(where_of)
    tests = {"rule_files": ["dashboard.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": input_series(exposition, 30),
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": name,
             "exp_alerts": [{"exp_labels": {}}] if name in expected else []}
            for name in where_of]}]}
    (tmp_path / "dashboard.test.yml").write_text(yaml.safe_dump(tests))
    done = run_promtool(promtool, "test", "rules", "dashboard.test.yml", cwd=tmp_path)
    output = done.stdout + done.stderr  # promtool tells the failures on stderr
    failed = "\n".join(f"{name}: {where}" for name, where in where_of.items()
                       if f"alertname: {name}," in output)
    assert done.returncode == 0, f"queries without the data expected:\n{failed}\n{output}"

