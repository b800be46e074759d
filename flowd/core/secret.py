"""Where a secret is kept, and reading it at the moment it is used.

Guarantees:
- a secret (a server's password, an HTTP token) is never read from the config file: it
  comes from an environment variable, else from a systemd credential in
  `$CREDENTIALS_DIRECTORY`;
- the config holds a `SecretRef` (where to find the secret), never the secret: loading a
  config reads no secret, so a command that does not use one (say `flowd status` on an
  operator's shell, without the service's credentials) never needs it, and the config's
  repr cannot show one;
- `reveal` reads it where it is used (a connection to that server, the HTTP server's
  start), each time: a missing secret is found there, not at load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flowd.core.errors import ConfigError

__all__ = ["CREDENTIALS_DIRECTORY", "SecretRef", "reveal", "secret_names", "token_ref"]

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"  # set by systemd (LoadCredential=)


@dataclass(frozen=True, slots=True)
class SecretRef:
    """The environment variable holding a secret, else the systemd credential holding it."""

    env: str
    credential: str

    @property
    def where(self) -> str:
        return f"{self.env} or the systemd credential {self.credential}"


def secret_names(kind: str, server: str = "") -> tuple[str, str]:
    """The environment variable and the systemd credential holding the password of a
    server: FLOWD_REDIS_PASSWORD / redis-password for [redis], FLOWD_REDIS_EDGE_PASSWORD /
    redis-edge-password for [redis.edge]."""
    infix = f"_{server.upper()}" if server else ""
    return (f"FLOWD_{kind.upper()}{infix}_PASSWORD",
            f"{kind}-{server}-password" if server else f"{kind}-password")


def token_ref(name: str) -> SecretRef:
    """Where the value of `[http.tokens.NAME]` is kept: FLOWD_HTTP_TOKEN_NAME, else the
    credential http-token-NAME."""
    return SecretRef(f"FLOWD_HTTP_TOKEN_{name.upper()}", f"http-token-{name}")


def reveal(ref: SecretRef | None) -> str | None:
    """The secret, read now; None when neither place holds one (or `ref` is None: a
    config made in code, with no place for a secret). The variable wins over the
    credential. A credential that is there but cannot be read is a ConfigError naming the
    file: guessing "no password" would only turn it into a refused login."""
    if ref is None:
        return None
    if value := os.environ.get(ref.env):
        return value
    directory = os.environ.get(CREDENTIALS_DIRECTORY)
    if not directory:
        return None
    path = Path(directory) / ref.credential
    try:
        return path.read_text().rstrip("\n") or None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(path, f"cannot read this systemd credential ({reason}); it is "
                                f"where {ref.env} is looked for when it is unset") from None
