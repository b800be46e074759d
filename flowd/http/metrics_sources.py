"""The `[[source]]` and `[[move]]` series of `/metrics`, made from each one's state in Redis
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

Every move series has the label `move` (the move's name):
- `flowd_move_partitions_moved_total`, `flowd_move_rows_moved_total`: partitions (and their
  rows) moved, verified on both servers and dropped from the hot one (counters);
- `flowd_move_partitions_in_hand`: partitions begun and not done (stuck ones included);
- `flowd_move_partitions_stuck`: partitions stopped for an operator (nothing more of them
  is dropped; `flowd status` says why);
- `flowd_move_last_run_failed`: 1 when its last run failed (it is retried with back-off);
- `flowd_move_desired_state{state}`: 1 for its desired state, 0 for the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowd.core.states import STATES
from flowd.sync.state import MoveState, SourceState

__all__ = ["move_families", "source_families"]

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
    desired = _desired("source")
    for state, now_ms in read:
        labels = [state.name]
        rows.add_metric(labels, state.rows)
        written.add_metric(labels, state.written)
        if (seconds := state.lag_s(now_ms)) is not None:
            lag.add_metric(labels, seconds)
        failed.add_metric(labels, int(state.last_outcome == "failed"))
        held.add_metric(labels, int(bool(state.held)))
        _add_desired(desired, labels, state.desired.state)
    yield from (rows, written, lag, failed, held, desired)


def move_families(read: Iterable[tuple[MoveState, int]]) -> Iterator[Metric]:
    """The families of the moves `read`: (its state, the Redis time it was read at, ms)."""
    read = list(read)
    if not read:
        return
    labels = ["move"]
    moved = CounterMetricFamily(
        "flowd_move_partitions_moved", "Partitions a move has moved, verified on both servers "
        "and dropped from the hot one.", labels=labels)
    rows = CounterMetricFamily("flowd_move_rows_moved", "Rows of the partitions moved.",
                               labels=labels)
    in_hand = GaugeMetricFamily("flowd_move_partitions_in_hand",
                                "Partitions a move has begun and not done (stuck ones too).",
                                labels=labels)
    stuck = GaugeMetricFamily(
        "flowd_move_partitions_stuck", "Partitions a move stopped for an operator: nothing "
        "more of them is dropped (flowd status says why).", labels=labels)
    failed = GaugeMetricFamily("flowd_move_last_run_failed",
                               "1 when the move's last run failed (retried with back-off).",
                               labels=labels)
    desired = _desired("move")
    for state, _ in read:
        named = [state.name]
        moved.add_metric(named, state.partitions_moved)
        rows.add_metric(named, state.rows_moved)
        in_hand.add_metric(named, len(state.in_hand))
        stuck.add_metric(named, len(state.stuck))
        failed.add_metric(named, int(state.last_outcome == "failed"))
        _add_desired(desired, named, state.desired.state)
    yield from (moved, rows, in_hand, stuck, failed, desired)


def _desired(kind: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        f"flowd_{kind}_desired_state", f"1 for the {kind}'s desired state (running, paused, "
        "draining), 0 for the others.", labels=[kind, "state"])


def _add_desired(family: GaugeMetricFamily, labels: list[str], state: str) -> None:
    for name in STATES:
        family.add_metric([*labels, name], int(state == name))
