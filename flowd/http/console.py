"""The web console: a page (flowd/console/) and the JSON API it reads, on the daemon's HTTP
server (flowd.http.server), answered from Redis alone.

What this module guarantees:
- The figures of `GET /v1/flows` are those of `flowd status --json` (flowd.admin.status.
  flow_status, item for item, same keys and values), with `rate` (the sum of `acked_per_s`
  of the live daemons in the registry running that flow's group), the desired state
  (flowd.daemon.control) and the state each live daemon applied. Nothing depends on which daemon
  serves the page: every figure is read from Redis.
- A reading route (GET) changes nothing. The figures (`/v1/flows`, `/v1/daemons`,
  `/v1/graph`) and the page hold no message data and are open. The dead letters (fields,
  reasons quoting values) need, once any token is configured, one with `read = true` or
  `control = true`: none or a wrong one 401 (`WWW-Authenticate: Bearer`), another 403,
  neither answer holding any letter. Without tokens the address is loopback (flowd.core.config).
- A changing route (POST: pause, resume, drain,
  replay, purge) needs `Authorization: Bearer TOKEN` of an `[http.tokens.NAME]` with
  `control = true`: none given, or one matching no token, 401; no control token in the
  config, or a token without control, 403; an unknown flow (or one without a dead-letter
  stream, for dead letters) 404; a bad body 400 — and on every refusal nothing is written.
  Purge and replay name the dead letters by id (at most MAX_IDS): nothing is dropped or
  sent back "all at once" by a request that forgot its ids; an id that is not there is a
  404 and nothing is done.
- Redis is asked on threads, never on the loop that moves the data: a small pool per
  server, one blocking client per server made on first use, with short socket timeouts.
  A Redis that does not answer costs the request a 503 after at most READ_TIMEOUT_S (a
  change: CHANGE_TIMEOUT_S); a read still running for an earlier request is shared, not
  asked again, so a page polling a hung server holds one thread, not one per poll.
- The assets are files of the package (flowd/console/: index.html, app.js, style.css,
  icon.svg, also served as /favicon.ico), served as they are: no build step, nothing
  fetched from another host (the page's Content-Security-Policy allows its own origin only).
- `GET /v1/rates` is the one answer that depends on the daemon serving it: each flow's rate
  as this daemon read it from the registry every RATE_EVERY_S since it started, for the
  last RATE_HISTORY_S (flowd.http.rates), so that a page opened now shows the minutes before it.
- A token's value never reaches a log or an answer; only its name is recorded, as who
  asked for a state (flowd.daemon.control's `by`).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import orjson
import redis
import structlog
from aiohttp import web

from flowd.admin import dlq, registry
from flowd.admin.graph import Graph, build
from flowd.admin.status import FlowStatus, Unanswered, flow_status, redis_title, server_label
from flowd.core import states
from flowd.core.config import Config, FlowConfig, HttpToken
from flowd.core.connections import connect_redis_sync
from flowd.core.errors import FlowdError
from flowd.core.retry import describe
from flowd.http.auth import Bearer, bearer_token
from flowd.http.rates import RateHistory

__all__ = ["ACTIONS", "CHANGE_TIMEOUT_S", "MAX_IDS", "READ_TIMEOUT_S", "Console"]

log = structlog.get_logger(__name__)

SOCKET_TIMEOUT_S = 2.0  # one Redis command; a person is waiting
READ_TIMEOUT_S = 10.0  # one answer of a reading route, every command it needs together
CHANGE_TIMEOUT_S = 30.0  # a replay of MAX_IDS letters is a few transactions of CHUNK
MAX_IDS = 1000  # dead letters named in one replay or purge
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 10.0
DEFAULT_COUNT, MAX_COUNT = 100, 1000  # dead letters listed in one answer
MAX_VALUE_CHARS = 4096  # a dead letter's field shown longer than this is cut
THREADS_PER_SERVER = 2  # the flows' figures and a dead-letter list do not wait on each other
ACTIONS = {"pause": states.PAUSED, "resume": states.RUNNING, "drain": states.DRAINING}
_ID = re.compile(r"\d+-\d+")
# The assets, by the name in their URL (/console/NAME): (file in flowd/console, type).
_ASSETS = {"app.js": ("app.js", "text/javascript; charset=utf-8"),
           "style.css": ("style.css", "text/css; charset=utf-8"),
           "icon.svg": ("icon.svg", "image/svg+xml")}
_PAGE = ("index.html", "text/html; charset=utf-8")
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _Refused(FlowdError):
    """A request answered with a problem, before anything was changed."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


def _json(value: Any, status: int = 200) -> web.Response:
    response = web.Response(body=orjson.dumps(value), status=status,
                            content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def _problem(status: int, message: str, **extra: Any) -> web.Response:
    response = _json({"error": message, **extra}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="flowd"'
    return response


def _text(value: bytes | str) -> str:
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else value


class Console:
    """The console's routes (see the module's docstring), for one config and the tokens
    of its HTTP server (flowd.http.auth.resolve)."""

    def __init__(self, config: Config, bearers: tuple[Bearer, ...]) -> None:
        self.config = config
        self.bearers = bearers
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._clients: dict[str, redis.Redis] = {}
        self._lock = threading.Lock()  # two threads of a server may make its client at once
        self._running: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._assets: dict[str, bytes] = {}
        self._closed = False
        self._rates = RateHistory([flow.name for flow in config.flows], self._flow_rates)

    def add_routes(self, app: web.Application) -> None:
        add_get, add_post = app.router.add_get, app.router.add_post
        add_get("/console", self._serve_page)
        add_get("/console/", self._serve_page)
        add_get("/console/{asset}", self._serve_asset)
        add_get("/favicon.ico", self._serve_icon)
        add_get("/v1/flows", self._serve_flows)
        add_get("/v1/rates", self._serve_rates)
        add_get("/v1/daemons", self._serve_daemons)
        add_get("/v1/graph", self._serve_graph)
        add_get("/v1/flows/{flow}/dead-letters", self._serve_dead_letters)
        add_post("/v1/flows/{flow}/dead-letters/replay", self._replay)
        add_post("/v1/flows/{flow}/dead-letters/purge", self._purge)
        for action in ACTIONS:
            add_post(f"/v1/flows/{{flow}}/{action}", self._steer)
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
        await self._rates.close()
        for server, client in list(self._clients.items()):  # on its own thread, after its call
            self._threads[server].submit(client.close)
        for executor in self._threads.values():
            executor.shutdown(wait=False)

    # -- Redis, on threads ---------------------------------------------------------------
    def _client(self, server: str) -> redis.Redis:
        """The blocking client of the Redis named `server` (bytes: a dead letter is kept
        byte for byte); on that server's threads only (a cluster client maps its slots as
        it is made, which blocks)."""
        with self._lock:
            client = self._clients.get(server)
            if client is None:
                client = self._clients[server] = connect_redis_sync(
                    self.config.redis_for(server), decode_responses=False,
                    socket_timeout=SOCKET_TIMEOUT_S, connect_timeout=SOCKET_TIMEOUT_S)
        return client

    async def _call(self, server: str, fn: Callable[[redis.Redis], Any], *,
                    shared: tuple[str, ...] | None = None,
                    timeout: float = READ_TIMEOUT_S) -> Any:
        """`fn(client)` on a thread of `server`, waited for at most `timeout`; with `shared`
        (a read's name), a call of the same name still running is awaited instead."""
        if self._closed:
            raise _Refused(503, "the server is stopping")
        if server not in self._threads:
            self._threads[server] = ThreadPoolExecutor(
                THREADS_PER_SERVER, thread_name_prefix=f"flowd-console-{server or 'default'}")
        running = self._running.get(shared) if shared is not None else None
        if running is None or running.done():
            running = asyncio.get_running_loop().run_in_executor(
                self._threads[server], lambda: fn(self._client(server)))
            running.add_done_callback(_retrieve)
            if shared is not None:
                self._running[shared] = running
        async with asyncio.timeout(timeout):
            return await asyncio.shield(running)

    def _unreachable(self, server: str, exc: BaseException) -> str:
        reason = f"no answer within {READ_TIMEOUT_S:g}s" if type(exc) is TimeoutError else \
            describe(exc)
        return f"cannot reach {redis_title(server, self.config.redis_for(server).url)}: {reason}"

    async def _guarded(self, server: str, fn: Callable[[redis.Redis], Any], *,
                       timeout: float = READ_TIMEOUT_S, **kwargs: Any) -> Any:
        """`_call`, with a Redis that does not answer turned into a 503 for the request."""
        try:
            return await self._call(server, fn, timeout=timeout, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError) as exc:
            message = self._unreachable(server, exc)
            log.warning("console: Redis does not answer", server=server_label(server),
                        error=message)
            raise _Refused(503, message) from None
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: a key holds something else
            raise _Refused(409, f"Redis refused: {exc}") from None

    # -- reading ---------------------------------------------------------------------------
    async def _figures(self) -> tuple[dict[str, FlowStatus | dict[str, Any]],
                                      dict[str, states.Desired]]:
        """Every flow's status (or, where its Redis did not answer, its place with the
        error), each read on the Redis the flow reads; and the desired states."""
        servers = sorted({flow.server for flow in self.config.flows})
        results = await asyncio.gather(*(
            self._call(server, lambda client, s=server: _read_server(self.config, s, client),
                       shared=("flows", server))
            for server in servers), return_exceptions=True)
        statuses: dict[str, FlowStatus | dict[str, Any]] = {}
        desired: dict[str, states.Desired] = {}
        for server, result in zip(servers, results, strict=True):
            flows = [flow for flow in self.config.flows if flow.server == server]
            if isinstance(result, BaseException):
                error = self._unreachable(server, result)
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
            return await self._call("", registry.list_daemons, shared=("daemons",)), None
        except Exception as exc:
            return [], self._unreachable("", exc)

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
        return _json({"flows": flows, "read_at": round(time.time(), 3),
                      "registry_error": registry_error, "actions": sorted(ACTIONS)})

    async def _serve_rates(self, request: web.Request) -> web.Response:
        return _json(self._rates.as_json())

    async def _serve_daemons(self, request: web.Request) -> web.Response:
        daemons, error = await self._daemons()
        if error is not None:
            return _problem(503, error)
        # As `flowd status --daemons`: long stopped or gone ones only with ?all=1.
        shown = daemons if request.query.get("all") == "1" else registry.recent(daemons)
        return _json({"daemons": shown, "not_shown": len(daemons) - len(shown),
                      "read_at": round(time.time(), 3)})

    async def _serve_graph(self, request: web.Request) -> web.Response:
        statuses, _ = await self._figures()
        live = {name: status for name, status in statuses.items()
                if isinstance(status, FlowStatus)}
        return _json(graph_json(build(self.config, live if live else None)))

    async def _serve_dead_letters(self, request: web.Request) -> web.Response:
        try:
            self._may_read(request)
            flow = self._dead_letter_flow(request)
            count = _count(request.query.get("count"))
            length, letters = await self._guarded(
                flow.server, lambda client: _list_letters(client, flow, count),
                shared=("dead-letters", flow.name, str(count)))
        except _Refused as refused:
            return _problem(refused.status, str(refused), **refused.extra)
        return _json({"flow": flow.name, "stream": flow.stream,
                      "dead_letter": flow.dead_letter, "length": length, "count": count,
                      "letters": letters})

    def _may_read(self, request: web.Request) -> None:
        """Message data is for a token with read (or control), once any is configured."""
        if not self.bearers:
            return
        token = bearer_token(self.bearers, request)
        if token is None:
            raise _Refused(401, "dead letters hold message data: a valid bearer token with "
                                "read = true or control = true is required (Authorization: "
                                "Bearer …)")
        if not token.may_read:
            raise _Refused(403, f"token {token.name!r} may not read dead letters (it has "
                                "neither read = true nor control = true)")

    # -- changing --------------------------------------------------------------------------
    def _authorize(self, request: web.Request) -> HttpToken:
        if not any(bearer.token.control for bearer in self.bearers):
            raise _Refused(403, "the console is read-only: no [http.tokens.NAME] has "
                                "control = true")
        token = bearer_token(self.bearers, request)
        if token is None:
            raise _Refused(401, "a valid bearer token is required (Authorization: Bearer …)")
        if not token.control:
            raise _Refused(403, f"token {token.name!r} may not change flows (it has no "
                                "control = true)")
        return token

    def _flow(self, request: web.Request) -> FlowConfig:
        name = request.match_info["flow"]
        try:
            return self.config.flow(name)
        except KeyError:
            raise _Refused(404, f"no flow named {name!r}") from None

    def _dead_letter_flow(self, request: web.Request) -> FlowConfig:
        flow = self._flow(request)
        if not flow.dead_letter:
            raise _Refused(404, f"flow {flow.name!r} has no dead-letter stream: its rejected "
                                "entries stay pending in its group")
        return flow

    async def _steer(self, request: web.Request) -> web.Response:
        action = request.path.rsplit("/", 1)[1]
        try:
            token = self._authorize(request)
            flow = self._flow(request)
            state = ACTIONS[action]
            by = f"http token {token.name} from {request.remote or 'unknown'}"
            at_ms = await self._guarded(
                flow.server, lambda client: states.set_desired(client, flow, state, by),
                timeout=CHANGE_TIMEOUT_S)
        except _Refused as refused:
            return _problem(refused.status, str(refused), **refused.extra)
        log.info(f"console: flow {state}", flow=flow.name, stream=flow.stream,
                 group=flow.group, token=token.name, remote=request.remote)
        return _json({"flow": flow.name, "state": state, "by": by, "at_ms": at_ms})

    async def _replay(self, request: web.Request) -> web.Response:
        return await self._move(request, "replay")

    async def _purge(self, request: web.Request) -> web.Response:
        return await self._move(request, "purge")

    async def _move(self, request: web.Request, action: str) -> web.Response:
        try:
            token = self._authorize(request)
            flow = self._dead_letter_flow(request)
            ids = _ids(await _read_body(request))
            moved = await self._guarded(
                flow.server, lambda client: _move_letters(client, flow, ids, action),
                timeout=CHANGE_TIMEOUT_S)
        except _Refused as refused:
            return _problem(refused.status, str(refused), **refused.extra)
        log.info(f"console: dead letters {action}ed", flow=flow.name, count=moved["done"],
                 dead_letter=flow.dead_letter, token=token.name, remote=request.remote)
        key = "replayed" if action == "replay" else "purged"
        return _json({"flow": flow.name, key: moved["done"], "kept": moved["kept"]})

    # -- the page ----------------------------------------------------------------------------
    def _asset(self, name: str) -> bytes:
        body = self._assets.get(name)
        if body is None:
            body = (resources.files("flowd.http") / "assets" / name).read_bytes()
            self._assets[name] = body
        return body

    async def _serve_page(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._asset(_PAGE[0]), content_type="text/html",
                                charset="utf-8")
        response.headers.update({"Content-Security-Policy": _CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer"})
        return response

    async def _serve_icon(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._asset("icon.svg"))
        response.headers.update({"Content-Type": "image/svg+xml",
                                 "Cache-Control": "max-age=86400",
                                 "X-Content-Type-Options": "nosniff"})
        return response

    async def _serve_asset(self, request: web.Request) -> web.Response:
        found = _ASSETS.get(request.match_info["asset"])
        if found is None:
            return _problem(404, "no such file of the console")
        response = web.Response(body=self._asset(found[0]))
        response.headers.update({"Content-Type": found[1], "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})
        return response


# -- what runs on the threads -----------------------------------------------------------------

def _read_server(config: Config, server: str, client: redis.Redis,
                 ) -> tuple[dict[str, FlowStatus | dict[str, Any]], dict[str, states.Desired]]:
    """The status of every flow reading `server`, and their desired states. A flow whose
    stream key is not a stream (WRONGTYPE) gets its place with the error; the others
    their figures."""
    flows = [flow for flow in config.flows if flow.server == server]
    statuses: dict[str, FlowStatus | dict[str, Any]] = {}
    for flow in flows:
        try:
            statuses[flow.name] = flow_status(client, flow)
        except redis.ResponseError as exc:
            statuses[flow.name] = Unanswered(flow.name, flow.stream, flow.group, server,
                                             f'stream "{flow.stream}": {exc}').as_dict()
    return statuses, states.read_desired(client, flows)


def _running_it(daemons: list[dict[str, Any]], flow: FlowConfig,
                ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, its entry for the flow) of each live daemon running the flow's group, on
    the same server, whatever its config calls the flow."""
    label = server_label(flow.server)
    return [(record, entry) for record in daemons if record.get("state") == "live"
            for entry in (record.get("flows") or {}).values()
            if entry.get("stream") == flow.stream and entry.get("group") == flow.group
            and entry.get("server", label) == label]


def _shown(value: bytes) -> tuple[str, bool]:
    text = _text(value)
    if len(text) <= MAX_VALUE_CHARS:
        return text, False
    return f"{text[:MAX_VALUE_CHARS]}… ({len(value)} bytes)", True


def _letter(letter: dlq.DeadLetter) -> dict[str, Any]:
    item = letter.as_dict()
    fields, cut = {}, []
    for key, value in letter.original.items():
        fields[_text(key)], was_cut = _shown(value)
        if was_cut:
            cut.append(_text(key))
    item["fields"], item["truncated"] = fields, cut
    return item


def _list_letters(client: redis.Redis, flow: FlowConfig,
                  count: int) -> tuple[int, list[dict[str, Any]]]:
    assert flow.dead_letter
    letters = []
    for letter in dlq.dead_letters(client, flow):
        if len(letters) >= count:
            break
        letters.append(_letter(letter))
    return int(client.xlen(flow.dead_letter)), letters


def _move_letters(client: redis.Redis, flow: FlowConfig, ids: list[str],
                  action: str) -> dict[str, Any]:
    """Replay or purge the dead letters `ids`, all of them there, or nothing (404)."""
    present = {letter.id: letter for letter in dlq.dead_letters(client, flow, ids=ids)}
    if missing := [i for i in ids if i not in present]:
        raise _Refused(404, f"{flow.dead_letter}: no dead letter of flow {flow.name!r} with "
                            f"id {', '.join(missing[:20])}; nothing was done", missing=missing)
    if action == "purge":
        return {"done": dlq.purge(client, flow, ids=ids), "kept": []}
    kept = [i for i in ids if not present[i].original]  # nothing to send back: purge them
    return {"done": dlq.replay(client, flow, ids=ids), "kept": kept}


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Consume the outcome of a call nobody waits for any more (it outlived its timeout)."""
    if not future.cancelled():
        future.exception()


# -- requests --------------------------------------------------------------------------------

def _count(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_COUNT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_COUNT:
        raise _Refused(400, f"count must be a whole number from 1 to {MAX_COUNT}")
    return int(raw)


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _Refused(400, f"body over {MAX_BODY_BYTES} bytes")
    parts, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.content.iter_chunked(65536):
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _Refused(400, f"body over {MAX_BODY_BYTES} bytes")
                parts.append(chunk)
    except TimeoutError:
        raise _Refused(400, f"body not received within {BODY_TIMEOUT_S:g} s") from None
    return b"".join(parts)


def _ids(body: bytes) -> list[str]:
    """The ids of a replay or purge body: {"ids": ["1700000000000-0", ...]}."""
    try:
        data = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError as exc:
        raise _Refused(400, f"body is not valid JSON: {exc}") from None
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids:
        raise _Refused(400, 'body must be {"ids": ["ID", ...]}: the dead letters to act on, '
                            "by id (there is no \"all\")")
    if len(ids) > MAX_IDS:
        raise _Refused(400, f"at most {MAX_IDS} ids in one request")
    if bad := [i for i in ids if not isinstance(i, str) or not _ID.fullmatch(i)]:
        raise _Refused(400, f"not a stream id (like 1700000000000-0): "
                            f"{', '.join(map(str, bad[:20]))}")
    return list(dict.fromkeys(ids))


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
