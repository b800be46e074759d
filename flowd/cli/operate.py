"""`flowd pause | resume | drain | dlq`: steer a flow (or a `[[source]]`'s or `[[move]]`'s
runs) on every daemon running it, and look at, replay or purge a flow's dead letters."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from flowd.cli.common import EXIT_FAILURE, EXIT_OK, load_config
from flowd.core import config as config_module
from flowd.core.config import Config, FlowConfig
from flowd.core.errors import ConfigError

if TYPE_CHECKING:
    import redis

    from flowd.admin.sources import Scheduled

__all__ = ["add_control", "add_dlq"]


_STATE_OF = {"pause": "paused", "resume": "running", "drain": "draining"}


def cmd_control(args: argparse.Namespace) -> int:
    """`flowd pause|resume|drain`: set the flow's desired state; with --wait, until every
    live daemon running it says it follows."""
    from flowd.admin.status import talking_to
    from flowd.core import states
    from flowd.core.connections import connect_redis_sync

    config = config_module.load(args.config)  # no handler needs importing to steer a flow
    for kind in ("source", "move"):
        if (name := getattr(args, kind)) is not None:
            return _control_scheduled(config, kind, name, args)
    flow = _flow_named(config, args.flow)
    state = _STATE_OF[args.command]
    with talking_to(config, connect_redis_sync(config.redis_for(flow.server)),
                    flow.server) as client:
        at_ms = states.set_desired(client, flow, state, states.operator())
    print(f"flow {flow.name} ({flow.stream}, group {flow.group}): {state}")
    if not args.wait:
        return EXIT_OK
    return _wait_for_daemons(config, flow, state, at_ms, args.timeout)


def _flow_named(config: Config, name: str) -> FlowConfig:
    for flow in config.flows:
        if flow.name == name:
            return flow
    raise ConfigError(config.path, f'--flow {name}: no such flow (flows: '
                      f'{", ".join(flow.name for flow in config.flows) or "none"})')


def _control_scheduled(config: Config, kind: str, name: str, args: argparse.Namespace) -> int:
    """`--source NAME` / `--move NAME`: set its desired state; with --wait, until no run of
    it is in hand (pause), or a run has finished its work since (drain)."""
    from flowd.admin import sources
    from flowd.admin.status import talking_to
    from flowd.core import states
    from flowd.core.connections import connect_redis_sync

    target = sources.scheduled_named(config, kind, name)
    if target is None:
        known = [s.name for s in (config.sources if kind == "source" else config.moves)]
        raise ConfigError(config.path, f"--{kind} {name}: no such {kind} ({kind}s: "
                          f'{", ".join(known) or "none"})')
    state = _STATE_OF[args.command]
    with talking_to(config, connect_redis_sync(config.redis_for(target.redis_server)),
                    target.redis_server) as client:
        at_ms = sources.set_scheduled_state(client, target, state, states.operator())
        print(f"{target.kind} {target.name}: {state}{_move_note(kind, name, state)}")
        if not args.wait:
            return EXIT_OK
        return _wait_for_runs(client, target, state, at_ms, args.timeout)


def _move_note(kind: str, name: str, state: str) -> str:
    """A move's flow is a flow of its own: steering the move leaves it running."""
    if kind != "move" or state == "running":
        return ""
    runs = "its runs stop between steps" if state == "paused" else \
        "the run in hand finishes its partitions, then none starts"
    return f" ({runs}; its flow move:{name} keeps committing what is in the via stream)"


def _wait_for_runs(client: redis.Redis, target: Scheduled, state: str, at_ms: int,
                   timeout: float) -> int:
    import time

    from flowd.admin.sources import unsettled

    deadline = time.monotonic() + timeout
    while (why := unsettled(client, target, state, at_ms)) is not None:
        if time.monotonic() >= deadline:
            print(f"flowd: after {timeout:g}s, {target.kind} {target.name} is not yet "
                  f"{state}: {why}", file=sys.stderr)
            return EXIT_FAILURE
        time.sleep(0.1)  # a person is waiting: ask Redis again shortly
    if state != "running":  # resuming waits for nothing: the next run is on its schedule
        print(f"no run of it is in hand ({state})")
    return EXIT_OK


def _wait_for_daemons(config: Config, flow: FlowConfig, state: str, at_ms: int,
                      timeout: float) -> int:
    import time

    from flowd.admin import registry
    from flowd.admin.status import talking_to
    from flowd.core.connections import connect_redis_sync

    deadline = time.monotonic() + timeout
    with talking_to(config, connect_redis_sync(config.redis)) as client:
        while True:
            waiting = [d for d in registry.list_daemons(client)
                       if d["state"] == "live" and (f := _same_flow(d, flow)) is not None
                       and (f.get("control") or {}).get("at_ms", 0) < at_ms]
            if not waiting:
                print(f"every live daemon running it follows ({state})")
                return EXIT_OK
            if time.monotonic() >= deadline:
                print(f"flowd: after {timeout:g}s, not yet followed by: "
                      f"{', '.join(d['id'] for d in waiting)}", file=sys.stderr)
                return EXIT_FAILURE
            time.sleep(0.1)  # a person is waiting: ask the registry again shortly


def _same_flow(record: dict, flow: FlowConfig) -> dict | None:
    """The record's entry for the consumer group of `flow`, whatever it calls it."""
    for entry in record.get("flows", {}).values():
        if entry.get("stream") == flow.stream and entry.get("group") == flow.group:
            return entry
    return None


def cmd_dlq(args: argparse.Namespace) -> int:
    from flowd.admin import dlq
    from flowd.core.connections import connect_redis_sync

    config = load_config(args.config)
    # Bytes, not text: a dead letter keeps the entry's fields byte for byte, and a replay
    # must put back exactly those bytes.
    # A flow's dead letters are on the Redis it reads.
    server = next((flow.server for flow in config.flows if flow.name == args.flow), "")
    return dlq.run(config, connect_redis_sync(config.redis_for(server), decode_responses=False),
                   action=args.action, flow_name=args.flow, ids=args.id or (),
                   count=getattr(args, "count", None), yes=getattr(args, "yes", False),
                   as_json=getattr(args, "json", False))


def add_control(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for command, text in (("pause", "finish the batches in hand, then read nothing"),
                          ("resume", "read again"),
                          ("drain", "finish what is pending, then read nothing new")):
        parser = sub.add_parser(
            command, help=f"every daemon running the flow (or source, move): {text}")
        parser.add_argument("--config", required=True, help="path to config.toml")
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--flow", help="the flow's name")
        which.add_argument("--source", help="a [[source]]'s name: its runs, on every daemon")
        which.add_argument("--move", help="a [[move]]'s name: its runs, on every daemon (its "
                                          "flow move:NAME is steered with --flow)")
        parser.add_argument("--wait", action="store_true",
                             help="until every live daemon running the flow follows; for a "
                                  "source or move, until no run is in hand (drain: a run has "
                                  "finished its work since)")
        parser.add_argument("--timeout", type=float, default=10.0,
                             help="seconds --wait waits at most (default 10); exit 1 after")
        parser.set_defaults(func=cmd_control)


def add_dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="list, replay or purge a flow's dead letters")
    dlq_actions = dlq.add_subparsers(dest="action", required=True)
    for action, text in (("list", "show dead letters with their reasons"),
                         ("replay", "move dead letters back to the flow's source stream"),
                         ("purge", "delete dead letters (needs --yes)")):
        parser = dlq_actions.add_parser(action, help=text)
        parser.add_argument("--config", required=True, help="path to config.toml")
        parser.add_argument("--flow", required=True, help="the flow's name")
        parser.add_argument("--id", action="append", metavar="ID",
                             help="only this dead letter (repeatable)")
        if action == "list":
            parser.add_argument("--count", type=int, metavar="N", help="show at most N")
            parser.add_argument("--json", action="store_true")
        if action == "purge":
            parser.add_argument("--yes", action="store_true", help="really delete")
        parser.set_defaults(func=cmd_dlq)
