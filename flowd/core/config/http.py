"""[http] and its [http.tokens.NAME]: the daemon's one HTTP address and who may use it.

A token's value is not read here (only the HTTP server needs it, when it starts), and an
address anyone can reach is refused unless a token guards it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flowd.core.config.daemon import address_problem
from flowd.core.config.model import DaemonConfig, HttpConfig, HttpToken, listen_address
from flowd.core.config.section import IDENTIFIER, Section, kind_of, positive
from flowd.core.errors import ConfigError
from flowd.core.secret import token_ref

__all__ = ["LISTEN_ENV", "read_http"]


_LOOPBACK = ("127.", "::1", "localhost")


LISTEN_ENV = "FLOWD_HTTP_LISTEN"  # this process's own address, over the file's


def _listen_override(path: Path, listen: str) -> str:
    """`FLOWD_HTTP_LISTEN`, when set, instead of the file's address: daemons sharing one
    config on one host each need an address of their own (a systemd template unit sets
    it per instance)."""
    value = os.environ.get(LISTEN_ENV)
    if value is None:
        return listen
    if problem := address_problem(value):
        raise ConfigError(path, f"{LISTEN_ENV}={value!r} (which overrides it): {problem}",
                          key="http.listen")
    return value


def read_http(path: Path, raw: dict[str, Any], daemon: DaemonConfig) -> HttpConfig:
    """[http]; without it, [daemon] metrics (the older name) serves /metrics and /healthz
    only, as it always did, on whatever address it names. FLOWD_HTTP_LISTEN overrides
    either."""
    if "http" not in raw:
        return HttpConfig(listen=_listen_override(path, daemon.metrics), ingest=False)
    table = raw["http"]
    section = Section(path, {k: v for k, v in table.items() if k != "tokens"}
                      if isinstance(table, dict) else table, prefix="http.", known={
                          "listen", "max_body_bytes", "body_timeout_s",
                          "idempotency_window_s", "any_stream"})
    d = HttpConfig()
    listen = section.get("listen", str, None, address_problem)
    if listen is None:
        listen = daemon.metrics if "daemon" in raw and "metrics" in raw["daemon"] else d.listen
    elif "daemon" in raw and "metrics" in raw["daemon"] and raw["daemon"]["metrics"] != listen:
        section.fail("listen", f"{listen!r} differs from daemon.metrics "
                     f"{raw['daemon']['metrics']!r}: they name one address, set only one")
    listen = _listen_override(path, listen)
    tokens = _tokens(path, table.get("tokens", {}))
    host = listen_address(listen)[0] if listen else None
    if listen and not tokens and (host is None or not host.startswith(_LOOPBACK)):
        section.fail("listen", f"{listen!r} is not a loopback address, and no [http.tokens] "
                     "is configured: anyone who reaches it could write to the streams. Add a "
                     "token, or listen on 127.0.0.1")
    return HttpConfig(
        listen=listen, tokens=tokens,
        max_body_bytes=section.get("max_body_bytes", int, d.max_body_bytes, positive),
        body_timeout_s=float(section.get("body_timeout_s", (int, float), d.body_timeout_s,
                                         positive)),
        idempotency_window_s=section.get("idempotency_window_s", int, d.idempotency_window_s,
                                         positive),
        any_stream=section.get("any_stream", bool, d.any_stream))


def _tokens(path: Path, table: Any) -> tuple[HttpToken, ...]:
    """The shape of every [http.tokens.NAME]. Their values are not read here: only the
    HTTP server needs them, when it starts (flowd.http.auth.resolve)."""
    if not isinstance(table, dict):
        raise ConfigError(path, f"must be a table of [http.tokens.NAME], got {kind_of(table)}",
                          key="http.tokens")
    tokens = []
    for name, body in table.items():
        key = f"http.tokens.{name}"
        if not IDENTIFIER.match(name):
            raise ConfigError(path, f"{name!r} is not a plain identifier (it names the "
                              "token's variable)", key=key)
        section = Section(path, body, prefix=f"{key}.", known={"streams", "control", "read"})
        control = section.get("control", bool, False)
        read = section.get("read", bool, False)
        streams = section.get("streams", list, [])
        if not all(isinstance(s, str) and s for s in streams):
            section.fail("streams", 'must be a list of stream names ("*": any stream)')
        if not streams and not control and not read:
            section.fail(None, "allows nothing: give it streams (to post to), read = true "
                               "(to read dead letters) or control = true (to change flows)")
        tokens.append(HttpToken(name=name, secret=token_ref(name), streams=tuple(streams),
                                control=control, read=read))
    return tuple(tokens)
