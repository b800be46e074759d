"""flowd's Lua scripts, each loaded into a server once and run by its SHA1 (EVALSHA).

A module names a script once, at its top level: `TAKE = Lua(r\"\"\"...\"\"\")`, and runs it with
`TAKE(client, keys, args)` (awaited for an asyncio client). What this guarantees:
- The script's text crosses the network only to load it: each call is an EVALSHA with the
  keys and arguments alone (the commit script is ~125 lines; a batch sends none of them).
- A server without the script (restarted, failed over, SCRIPT FLUSH) answers NOSCRIPT,
  which runs nothing of it; the script is then loaded (SCRIPT LOAD, on every primary of a
  cluster) and the same call sent again. So a script that writes is still run exactly once.
- The same for every kind of client: redis.Redis, redis.asyncio.Redis, both cluster
  clients (EVALSHA goes to the node of the first key), and pipelines (redis-py loads the
  pipeline's scripts before it sends them).
The redis-py Script object behind a call is made once per client (`register_script`) and
forgotten with the client: the daemon makes a client per server, the CLI one per command.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from redis.commands.core import AsyncScript, Script

__all__ = ["Lua"]


class Lua:
    """One Lua script: its text, and its redis-py Script object for each client."""

    __slots__ = ("_scripts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._scripts: weakref.WeakKeyDictionary[Any, Script | AsyncScript] = \
            weakref.WeakKeyDictionary()

    def on(self, client: Any) -> Script | AsyncScript:
        """The Script object for `client`, registered at its first use."""
        script = self._scripts.get(client)
        if script is None:
            script = self._scripts[client] = client.register_script(self.text)
        return script

    def __call__(self, client: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """Run on `client` (EVALSHA; loaded first if the server lacks it): the reply, or an
        awaitable of it for an asyncio client."""
        return self.on(client)(keys, args)
