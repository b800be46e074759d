"""The console's page and its files (flowd/http/assets/), served as they are: no build
step, nothing fetched from another host (the page's Content-Security-Policy allows its own
origin only). The icon is also /favicon.ico."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from flowd.http.console_requests import problem

__all__ = ["ConsoleAssets"]

# The assets, by the name in their URL (/console/NAME): (file in flowd/http/assets, type).
_ASSETS = {"app.js": ("app.js", "text/javascript; charset=utf-8"),
           "style.css": ("style.css", "text/css; charset=utf-8"),
           "icon.svg": ("icon.svg", "image/svg+xml")}
_PAGE = ("index.html", "text/html; charset=utf-8")
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ConsoleAssets:
    """The page's routes; each file read from the package once, then kept."""

    def __init__(self) -> None:
        self._assets: dict[str, bytes] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/console", self._serve_page)
        app.router.add_get("/console/", self._serve_page)
        app.router.add_get("/console/{asset}", self._serve_asset)
        app.router.add_get("/favicon.ico", self._serve_icon)

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
            return problem(404, "no such file of the console")
        response = web.Response(body=self._asset(found[0]))
        response.headers.update({"Content-Type": found[1], "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})
        return response
