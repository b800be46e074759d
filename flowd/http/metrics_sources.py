"""The `[[source]]` series of `/metrics`, made from each source's state in Redis
(flowd.sync.state) as read at scrape time, so every daemon serving them says the same, and
a restart loses nothing: they hold no per-process count.

Every series has the label `source` (the source's name):
- `flowd_source_rows_total`, `flowd_source_written_total`: rows its cursor has passed,
  entries it added to its streams (counters: they only grow, kept with the cursor);
- `flowd_source_lag_seconds`: seconds since a run last found no row after the cursor
  (absent until one has);
- `flowd_source_last_run_failed`: 1 when its last run failed (it is retried with back-off);
- `flowd_source_held`: 1 while an output at its max_len holds it back;
- `flowd_source_desired_state{state}`: 1 for its desired state, 0 for the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowd.core.states import STATES
from flowd.sync.state import SourceState

__all__ = ["source_families"]

_LABELS = ["source"]


def source_families(read: Iterable[tuple[SourceState, int]]) -> Iterator[Metric]:
    """The families of the sources `read`: (its state, the Redis time it was read at, ms)."""
    read = list(read)
    if not read:
        return
    rows = CounterMetricFamily("flowd_source_rows", "Rows a source's cursor has passed.",
                               labels=_LABELS)
    written = CounterMetricFamily(
        "flowd_source_written", "Entries a source added to its streams (fewer than rows when "
        "`when` routes a row nowhere).", labels=_LABELS)
    lag = GaugeMetricFamily(
        "flowd_source_lag_seconds", "Seconds since a run of the source last found no row "
        "after its cursor (absent until one has).", labels=_LABELS)
    failed = GaugeMetricFamily("flowd_source_last_run_failed",
                               "1 when the source's last run failed (retried with back-off).",
                               labels=_LABELS)
    held = GaugeMetricFamily("flowd_source_held",
                             "1 while an output at its max_len holds the source back.",
                             labels=_LABELS)
    desired = GaugeMetricFamily(
        "flowd_source_desired_state", "1 for the source's desired state (running, paused, "
        "draining), 0 for the others.", labels=[*_LABELS, "state"])
    for state, now_ms in read:
        labels = [state.name]
        rows.add_metric(labels, state.rows)
        written.add_metric(labels, state.written)
        if (seconds := state.lag_s(now_ms)) is not None:
            lag.add_metric(labels, seconds)
        failed.add_metric(labels, int(state.last_outcome == "failed"))
        held.add_metric(labels, int(bool(state.held)))
        for name in STATES:
            desired.add_metric([*labels, name], int(state.desired.state == name))
    yield from (rows, written, lag, failed, held, desired)
