"""The daemon's one HTTP address, served by aiohttp on the daemon's own event loop.

`/metrics` (Prometheus), `/healthz`, `/openapi.json` and, when the config has an `[http]`
section, `POST /v1/streams/{stream}` (flowd.http.ingest) and the web console with its JSON API
(`/console`, `/v1/flows`...: flowd.http.console). Served on the loop that moves the
data, not in a thread: a scrape that gets an answer proves that loop is not stuck. Every
answer is counted per route, stream and status for /metrics.
"""

from __future__ import annotations

import contextlib
import html
import os
import resource
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from flowd.core.errors import ConfigurationError
from flowd.http.console import Console
from flowd.http.ingest import Ingest
from flowd.http.openapi import document

__all__ = ["HttpServer", "ServeError"]

log = structlog.get_logger(__name__)

Metrics = Callable[[str], Awaitable[tuple[bytes, str]]]
Health = Callable[[], Awaitable[tuple[bool, dict[str, str]]]]


def _raise_open_files_limit() -> None:
    """Every HTTP client holds a descriptor: the soft limit (often 1024) would refuse
    clients long before the loop is busy, so take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ServeError(ConfigurationError):
    """The address cannot be served (taken, not ours): named with its config key."""


class HttpServer:
    """`console`: the web console's routes; when none is given, an address that serves the
    ingest (the config has [http]) serves the console of the ingest's config and tokens:
    it needs only those. An address without [http] (the older `[daemon] metrics`, which may listen
    anywhere without a token) has none: the console shows dead letters' data."""

    def __init__(self, *, metrics: Metrics, health: Health, ingest: Ingest | None = None,
                 registry: CollectorRegistry | None = None,
                 console: Console | None = None) -> None:
        self._metrics, self._health, self.ingest = metrics, health, ingest
        if console is None and ingest is not None:
            console = Console(ingest.config, ingest.bearers)
        self.console = console
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self._requests = self._seconds = None
        if registry is not None:
            self._requests = Counter(
                "flowd_http_requests", "HTTP requests answered, by route, stream and status",
                ["route", "stream", "status"], registry=registry)
            self._seconds = Histogram(
                "flowd_http_request_seconds", "Time to answer an ingest request",
                ["stream"], registry=registry)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count], client_max_size=1024)
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._serve_health)
        app.router.add_get("/openapi.json", self._serve_openapi)
        app.router.add_get("/", self._serve_index)
        if self.ingest is not None:
            app.router.add_post("/v1/streams/{stream}", self.ingest.handle)
        if self.console is not None:
            self.console.add_routes(app)
        return app

    async def start(self, host: str | None, port: int, *, unix_path: str | None = None,
                    what: str = "") -> None:
        _raise_open_files_limit()
        # Keep-alive is bounded so idle connections do not pile up; a slow body is bounded
        # by the ingest's own deadline.
        self._runner = web.AppRunner(self.app(), access_log=None, keepalive_timeout=15,
                                     handle_signals=False)
        await self._runner.setup()
        site = web.UnixSite(self._runner, unix_path) if unix_path else \
            web.TCPSite(self._runner, host, port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.close()
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else \
                exc.strerror or str(exc)
            raise ServeError(f"cannot serve {what or 'HTTP'}: {reason}") from None
        if not unix_path:
            server = site._server  # the port the kernel gave for ":0"
            self.port = server.sockets[0].getsockname()[1] if server else port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.ingest is not None:
            await self.ingest.close()
            self.ingest = None
        if self.console is not None:
            await self.console.close()
            self.console = None

    @web.middleware
    async def _count(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                     ) -> web.StreamResponse:
        started = time.monotonic()
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "other"
        stream = request.match_info.get("stream", "")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        if self._requests is not None:
            known = self.ingest is not None and stream in self.ingest.known
            label = stream if known or not stream else "(unknown)"  # bounded cardinality
            self._requests.labels(name, label, str(response.status)).inc()
            if stream and self._seconds is not None:
                self._seconds.labels(label).observe(time.monotonic() - started)
        if isinstance(response, web.HTTPException):
            raise response
        return response

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        body, content_type = await self._metrics(request.headers.get("Accept", ""))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _serve_health(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        healthy, checks = await self._health()
        lines = ["ok" if healthy else "unhealthy",
                 *(f"{name}: {word}" for name, word in checks.items())]
        if not healthy:
            log.warning("health check failed", checks=checks,
                        seconds=round(time.monotonic() - started, 2))
        return web.Response(text="\n".join(lines) + "\n", status=200 if healthy else 503)

    async def _serve_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    async def _serve_index(self, request: web.Request) -> web.Response:
        paths = [("/metrics", "Prometheus"), ("/healthz", ""), ("/openapi.json", "")]
        if self.console is not None:
            paths.insert(0, ("/console", "the web console"))
        if self.ingest is not None:
            paths.append(("POST /v1/streams/{stream}", ""))
        if "text/html" in request.headers.get("Accept", ""):  # a browser: links
            items = "".join(
                f'<li><a href="{html.escape(path)}">{html.escape(path)}</a> {html.escape(what)}'
                if not path.startswith("POST") else f"<li>{html.escape(path)}"
                for path, what in paths)
            return web.Response(text=f"<!doctype html><title>flowd</title><h1>flowd</h1>"
                                     f"<ul>{items}</ul>\n", content_type="text/html")
        shown = ", ".join(f"{path} ({what})" if what else path for path, what in paths)
        return web.Response(text=f"flowd: {shown}\n")
