"""The web console: a page (flowd/console/) and the JSON API it reads, on the daemon's HTTP
server (flowd.http.server), answered from Redis alone.

What this module guarantees:
- The figures of `GET /v1/flows` are those of `flowd status --json` (flowd.admin.status.
  flow_status, item for item, same keys and values), with `rate` (the sum of `acked_per_s`
  of the live daemons in the registry running that flow's group), the desired state
  (flowd.daemon.control) and the state each live daemon applied. Nothing depends on which daemon
  serves the page: every figure is read from Redis.
- A reading route (GET) changes nothing. The figures (`/v1/flows`, `/v1/sources`,
  `/v1/moves`, `/v1/daemons`, `/v1/graph`) and the page hold no message data and are open.
  `/v1/sources` and `/v1/moves` give each `[[source]]` and `[[move]]` as `flowd status
  --json` does (flowd.admin.scheduled_status). The dead
  letters (fields, reasons quoting values) need, once any token is configured, one with
  `read = true` or `control = true`: none or a wrong one 401 (`WWW-Authenticate:
  Bearer`), another 403, neither answer holding any letter. Without tokens the address is
  loopback (flowd.core.config).
- A changing route (POST: pause, resume, drain of a flow, a source or a move,
  replay, purge) needs `Authorization: Bearer TOKEN` of an `[http.tokens.NAME]` with
  `control = true`: none given, or one matching no token, 401; no control token in the
  config, or a token without control, 403; an unknown flow, source or move (or a flow without a
  dead-letter stream, for dead letters) 404; a bad body 400 — and on every refusal
  nothing is written.
  Purge and replay name the dead letters by id (at most MAX_IDS): nothing is dropped or
  sent back "all at once" by a request that forgot its ids; an id that is not there is a
  404 and nothing is done.
- Redis is asked on threads, never on the loop that moves the data (flowd.http.console_redis):
  a Redis that does not answer costs the request a 503 after at most READ_TIMEOUT_S (a
  change: CHANGE_TIMEOUT_S), and a page polling a hung server holds one thread.
- The assets are files of the package (flowd/http/assets/: index.html, app.js, style.css,
  icon.svg, also served as /favicon.ico), served as they are (flowd.http.console_assets):
  no build step, nothing fetched from another host.
- `GET /v1/rates` is the one answer that depends on the daemon serving it: each flow's rate
  as this daemon read it from the registry every RATE_EVERY_S since it started, for the
  last RATE_HISTORY_S (flowd.http.rates), so that a page opened now shows the minutes before it.
- A token's value never reaches a log or an answer; only its name is recorded, as who
  asked for a state (flowd.daemon.control's `by`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from aiohttp import web

from flowd.admin import registry
from flowd.admin.figures import server_label
from flowd.admin.graph import Graph, build
from flowd.admin.scheduled_status import (
    move_item,
    read_moves,
    read_sources,
    source_item,
    unanswered_item,
    unanswered_move,
)
from flowd.admin.sources import scheduled_named, set_scheduled_state
from flowd.admin.status import FlowStatus, Unanswered
from flowd.core import states
from flowd.core.config import Config, FlowConfig, HttpToken, SourceConfig
from flowd.http.auth import Bearer, bearer_token
from flowd.http.console_assets import ConsoleAssets
from flowd.http.console_redis import (
    RedisThreads,
    list_letters,
    move_letters,
    read_server,
)
from flowd.http.console_requests import (
    Refused,
    answer,
    count_asked,
    ids_asked,
    problem,
    read_body,
)
from flowd.http.rates import RateHistory

__all__ = ["ACTIONS", "CHANGE_TIMEOUT_S", "Console", "graph_json"]

log = structlog.get_logger(__name__)

CHANGE_TIMEOUT_S = 30.0  # a replay of MAX_IDS letters is a few transactions of CHUNK
ACTIONS = {"pause": states.PAUSED, "resume": states.RUNNING, "drain": states.DRAINING}


class Console:
    """The console's routes (see the module's docstring), for one config and the tokens
    of its HTTP server (flowd.http.auth.resolve)."""

    def __init__(self, config: Config, bearers: tuple[Bearer, ...]) -> None:
        self.config = config
        self.bearers = bearers
        self._redis = RedisThreads(config)
        self._assets = ConsoleAssets()
        self._closed = False
        self._rates = RateHistory([flow.name for flow in config.flows], self._flow_rates)

    def add_routes(self, app: web.Application) -> None:
        self._assets.add_routes(app)
        add_get, add_post = app.router.add_get, app.router.add_post
        add_get("/v1/flows", self._serve_flows)
        add_get("/v1/rates", self._serve_rates)
        add_get("/v1/daemons", self._serve_daemons)
        add_get("/v1/graph", self._serve_graph)
        add_get("/v1/flows/{flow}/dead-letters", self._serve_dead_letters)
        add_post("/v1/flows/{flow}/dead-letters/replay", self._replay)
        add_post("/v1/flows/{flow}/dead-letters/purge", self._purge)
        for action in ACTIONS:
            add_post(f"/v1/flows/{{flow}}/{action}", self._steer)
        add_get("/v1/sources", self._serve_sources)
        add_get("/v1/moves", self._serve_moves)
        for action in ACTIONS:
            add_post(f"/v1/sources/{{source}}/{action}", self._steer_scheduled)
            add_post(f"/v1/moves/{{move}}/{action}", self._steer_scheduled)
        app.on_startup.append(self._rates.start)

    async def _flow_rates(self) -> dict[str, float | None]:
        """Each flow's rate as /v1/flows gives it (None for all: the registry is unread)."""
        daemons, error = await self._daemons()
        return {flow.name: None if error is not None else round(sum(
            entry.get("acked_per_s") or 0 for _, entry in _running_it(daemons, flow)), 3)
            for flow in self.config.flows}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._redis.refuse()
        await self._rates.close()
        self._redis.close()

    # -- reading ---------------------------------------------------------------------------
    async def _figures(self) -> tuple[dict[str, FlowStatus | dict[str, Any]],
                                      dict[str, states.Desired]]:
        """Every flow's status (or, where its Redis did not answer, its place with the
        error), each read on the Redis the flow reads; and the desired states."""
        servers = sorted({flow.server for flow in self.config.flows})
        results = await asyncio.gather(*(
            self._redis.call(server, lambda client, s=server: read_server(self.config, s, client),
                             shared=("flows", server))
            for server in servers), return_exceptions=True)
        statuses: dict[str, FlowStatus | dict[str, Any]] = {}
        desired: dict[str, states.Desired] = {}
        for server, result in zip(servers, results, strict=True):
            flows = [flow for flow in self.config.flows if flow.server == server]
            if isinstance(result, BaseException):
                error = self._redis.unreachable(server, result)
                statuses.update({flow.name: Unanswered(
                    flow.name, flow.stream, flow.group, server, error).as_dict()
                    for flow in flows})
                continue
            found, wanted = result
            statuses.update(found)
            desired.update(wanted)
        return statuses, desired

    async def _daemons(self) -> tuple[list[dict[str, Any]], str | None]:
        """The registry's daemons (it lives on the unnamed [redis]), or the error."""
        try:
            return await self._redis.call("", registry.list_daemons, shared=("daemons",)), None
        except Exception as exc:
            return [], self._redis.unreachable("", exc)

    async def _serve_flows(self, request: web.Request) -> web.Response:
        (statuses, desired), (daemons, registry_error) = await asyncio.gather(
            self._figures(), self._daemons())
        flows = []
        for flow in self.config.flows:
            status = statuses[flow.name]
            item = status.as_dict() if isinstance(status, FlowStatus) else dict(status)
            running = _running_it(daemons, flow)
            item["rate"] = round(sum(entry.get("acked_per_s") or 0 for _, entry in running),
                                 3) if registry_error is None else None
            item["desired"] = desired[flow.name].as_dict() if flow.name in desired else None
            item["daemons"] = [{"id": record.get("id"), "host": record.get("host"),
                                "pid": record.get("pid"), "state": entry.get("state"),
                                "acked": entry.get("acked"),
                                "acked_per_s": entry.get("acked_per_s")}
                               for record, entry in running]
            flows.append(item)
        return answer({"flows": flows, "read_at": round(time.time(), 3),
                       "registry_error": registry_error, "actions": sorted(ACTIONS)})

    async def _serve_rates(self, request: web.Request) -> web.Response:
        return answer(self._rates.as_json())

    async def _serve_daemons(self, request: web.Request) -> web.Response:
        daemons, error = await self._daemons()
        if error is not None:
            return problem(503, error)
        # As `flowd status --daemons`: long stopped or gone ones only with ?all=1.
        shown = daemons if request.query.get("all") == "1" else registry.recent(daemons)
        return answer({"daemons": shown, "not_shown": len(daemons) - len(shown),
                       "read_at": round(time.time(), 3)})

    async def _serve_graph(self, request: web.Request) -> web.Response:
        statuses, _ = await self._figures()
        live = {name: status for name, status in statuses.items()
                if isinstance(status, FlowStatus)}
        return answer(graph_json(build(self.config, live if live else None)))

    async def _serve_dead_letters(self, request: web.Request) -> web.Response:
        try:
            self._may_read(request)
            flow = self._dead_letter_flow(request)
            count = count_asked(request.query.get("count"))
            length, letters = await self._redis.guarded(
                flow.server, lambda client: list_letters(client, flow, count),
                shared=("dead-letters", flow.name, str(count)))
        except Refused as refused:
            return problem(refused.status, str(refused), **refused.extra)
        return answer({"flow": flow.name, "stream": flow.stream,
                       "dead_letter": flow.dead_letter, "length": length, "count": count,
                       "letters": letters})

    def _may_read(self, request: web.Request) -> None:
        """Message data is for a token with read (or control), once any is configured."""
        if not self.bearers:
            return
        token = bearer_token(self.bearers, request)
        if token is None:
            raise Refused(401, "dead letters hold message data: a valid bearer token with "
                               "read = true or control = true is required (Authorization: "
                               "Bearer …)")
        if not token.may_read:
            raise Refused(403, f"token {token.name!r} may not read dead letters (it has "
                               "neither read = true nor control = true)")

    # -- changing --------------------------------------------------------------------------
    def _authorize(self, request: web.Request) -> HttpToken:
        if not any(bearer.token.control for bearer in self.bearers):
            raise Refused(403, "the console is read-only: no [http.tokens.NAME] has "
                               "control = true")
        token = bearer_token(self.bearers, request)
        if token is None:
            raise Refused(401, "a valid bearer token is required (Authorization: Bearer …)")
        if not token.control:
            raise Refused(403, f"token {token.name!r} may not change flows (it has no "
                               "control = true)")
        return token

    def _flow(self, request: web.Request) -> FlowConfig:
        name = request.match_info["flow"]
        try:
            return self.config.flow(name)
        except KeyError:
            raise Refused(404, f"no flow named {name!r}") from None

    def _dead_letter_flow(self, request: web.Request) -> FlowConfig:
        flow = self._flow(request)
        if not flow.dead_letter:
            raise Refused(404, f"flow {flow.name!r} has no dead-letter stream: its rejected "
                               "entries stay pending in its group")
        return flow

    async def _steer(self, request: web.Request) -> web.Response:
        action = request.path.rsplit("/", 1)[1]
        try:
            token = self._authorize(request)
            flow = self._flow(request)
            state = ACTIONS[action]
            by = f"http token {token.name} from {request.remote or 'unknown'}"
            at_ms = await self._redis.guarded(
                flow.server, lambda client: states.set_desired(client, flow, state, by),
                timeout=CHANGE_TIMEOUT_S)
        except Refused as refused:
            return problem(refused.status, str(refused), **refused.extra)
        log.info(f"console: flow {state}", flow=flow.name, stream=flow.stream,
                 group=flow.group, token=token.name, remote=request.remote)
        return answer({"flow": flow.name, "state": state, "by": by, "at_ms": at_ms})

    # -- sources ---------------------------------------------------------------------------
    async def _serve_sources(self, request: web.Request) -> web.Response:
        """Each [[source]] as `flowd status --json` gives it, read on the Redis of its
        streams (one that does not answer: its sources with the error)."""
        by_server: dict[str, list[SourceConfig]] = {}
        for source in self.config.sources:
            by_server.setdefault(source.redis_server, []).append(source)
        results = await asyncio.gather(*(
            self._redis.call(server, lambda client, s=sources: read_sources(client, s),
                             shared=("sources", server))
            for server, sources in by_server.items()), return_exceptions=True)
        items: dict[str, dict[str, Any]] = {}
        for (server, sources), result in zip(by_server.items(), results, strict=True):
            if isinstance(result, BaseException):
                error = self._redis.unreachable(server, result)
                items.update({source.name: unanswered_item(source, error)
                              for source in sources})
                continue
            now_ms, found = result
            items.update({source.name: source_item(source, state, now_ms)
                          for source, state in zip(sources, found, strict=True)})
        return answer({"sources": [items[source.name] for source in self.config.sources],
                       "read_at": round(time.time(), 3), "actions": sorted(ACTIONS)})

    async def _serve_moves(self, request: web.Request) -> web.Response:
        """Each [[move]] as `flowd status --json` gives it, read on the unnamed [redis]."""
        moves = self.config.moves
        try:
            now_ms, found = await self._redis.call(
                "", lambda client: read_moves(client, moves), shared=("moves",))
            items = [move_item(m, state, now_ms) for m, state in zip(moves, found, strict=True)]
        except Refused as refused:
            return problem(refused.status, str(refused), **refused.extra)
        except Exception as exc:
            error = self._redis.unreachable("", exc)
            items = [unanswered_move(move, error) for move in moves]
        return answer({"moves": items, "read_at": round(time.time(), 3),
                       "actions": sorted(ACTIONS)})

    async def _steer_scheduled(self, request: web.Request) -> web.Response:
        """POST /v1/sources/NAME/ACTION or /v1/moves/NAME/ACTION."""
        kind = "source" if request.path.startswith("/v1/sources/") else "move"
        action = request.path.rsplit("/", 1)[1]
        try:
            token = self._authorize(request)
            name = request.match_info[kind]
            target = scheduled_named(self.config, kind, name)
            if target is None:
                raise Refused(404, f"no {kind} named {name!r}")
            state = ACTIONS[action]
            by = f"http token {token.name} from {request.remote or 'unknown'}"
            at_ms = await self._redis.guarded(
                target.redis_server,
                lambda client: set_scheduled_state(client, target, state, by),
                timeout=CHANGE_TIMEOUT_S)
        except Refused as refused:
            return problem(refused.status, str(refused), **refused.extra)
        log.info(f"console: {kind} {state}", **{kind: name}, token=token.name,
                 remote=request.remote)
        return answer({kind: name, "state": state, "by": by, "at_ms": at_ms})

    async def _replay(self, request: web.Request) -> web.Response:
        return await self._move(request, "replay")

    async def _purge(self, request: web.Request) -> web.Response:
        return await self._move(request, "purge")

    async def _move(self, request: web.Request, action: str) -> web.Response:
        try:
            token = self._authorize(request)
            flow = self._dead_letter_flow(request)
            ids = ids_asked(await read_body(request))
            moved = await self._redis.guarded(
                flow.server, lambda client: move_letters(client, flow, ids, action),
                timeout=CHANGE_TIMEOUT_S)
        except Refused as refused:
            return problem(refused.status, str(refused), **refused.extra)
        log.info(f"console: dead letters {action}ed", flow=flow.name, count=moved["done"],
                 dead_letter=flow.dead_letter, token=token.name, remote=request.remote)
        key = "replayed" if action == "replay" else "purged"
        return answer({"flow": flow.name, key: moved["done"], "kept": moved["kept"]})


def _running_it(daemons: list[dict[str, Any]], flow: FlowConfig,
                ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, its entry for the flow) of each live daemon running the flow's group, on
    the same server, whatever its config calls the flow."""
    label = server_label(flow.server)
    return [(record, entry) for record in daemons if record.get("state") == "live"
            for entry in (record.get("flows") or {}).values()
            if entry.get("stream") == flow.stream and entry.get("group") == flow.group
            and entry.get("server", label) == label]


def graph_json(graph: Graph) -> dict[str, Any]:
    """The data-flow graph for the page to lay out: groups (servers), nodes, edges."""
    return {
        "live": graph.live,
        "groups": [{"key": g.key, "kind": g.kind, "lines": list(g.lines)}
                   for g in graph.groups.values()],
        "nodes": [{"key": n.key, "kind": n.kind, "lines": list(n.lines), "group": n.group}
                  for n in graph.nodes.values()],
        "edges": [{"source": e.source, "target": e.target, "kind": e.kind,
                   "lines": list(e.lines)} for e in graph.edges],
    }
