"""Who may do what over HTTP: the bearer tokens of `[http.tokens.NAME]`.

Guarantees:
- a token's value is read when the HTTP server starts (`resolve`), never at config load:
  every command that serves no HTTP works without it; a server that would start without
  one fails with a ConfigError naming the token's key and where its value is looked for;
- a request's token is compared with every configured one in constant time
  (`bearer_token`): the answer's timing tells nothing about which, or how much, matched;
- a token's value never reaches a log, a metric, an answer or a repr (only its name does).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from aiohttp import web

from flowd.core.config import Config, HttpToken
from flowd.core.errors import ConfigError
from flowd.core.secret import reveal

__all__ = ["Bearer", "bearer_token", "resolve"]


@dataclass(frozen=True, slots=True)
class Bearer:
    """A token of the config with its value, as the HTTP server holds it."""

    token: HttpToken
    value: bytes = field(repr=False)


def resolve(config: Config) -> tuple[Bearer, ...]:
    """Every token's value, read now: the HTTP server is starting."""
    bearers = []
    for token in config.http.tokens:
        value = reveal(token.secret)
        if not value:
            raise ConfigError(config.path, f"no value: set {token.secret.where} (tokens are "
                              "never read from the file)", key=f"http.tokens.{token.name}")
        bearers.append(Bearer(token, value.encode()))
    return tuple(bearers)


def bearer_token(bearers: tuple[Bearer, ...], request: web.Request) -> HttpToken | None:
    """The token the request's `Authorization: Bearer …` names, or None. Every token is
    compared, in constant time, whatever matches: the answer's timing tells nothing."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    offered = given.strip().encode()
    found = None
    for bearer in bearers:
        if hmac.compare_digest(bearer.value, offered):
            found = bearer.token
    return found
