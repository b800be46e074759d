"""Handler discovery through the entry-point group ``flowd.handlers``.

Built-in handlers register exactly like third-party ones, so `pip install` of a package
with a ``flowd.handlers`` entry point is all it takes to make a handler available.

A process runs the code it imported first: a later `pip install` of a new version changes
the files, not the modules already imported, and loading the handler again returns the old
code. So a loaded handler's `version` is its package's version when this process first
imported it, and `upgraded()` tells which running handlers have another version on disk
(the daemon warns on SIGHUP: only a restart runs it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from flowd.core.config import FlowConfig
from flowd.core.errors import ConfigError, PluginError
from flowd.plugin.decode import Decoded
from flowd.plugin.handler import Outcome, normalise, to_dataframe, traits

__all__ = ["GROUP", "LoadedHandler", "available", "load", "load_for_flow", "run_in_worker",
           "upgraded"]

GROUP = "flowd.handlers"


@dataclass(frozen=True, slots=True)
class LoadedHandler:
    name: str
    target: Any
    cpu_bound: bool
    batch_format: str
    origin: str  # "module:attr (distribution version)" for `flowd check`
    distribution: str = ""  # the package it comes from ("" when the entry point has none)
    version: str = ""  # that package's version as this process imported it

    def as_dict(self) -> dict[str, str]:
        """What the registry records of it: what a daemon runs, not what is on disk."""
        return {"name": self.name, "distribution": self.distribution,
                "version": self.version}

    def run(self, batch: Decoded) -> Outcome:
        """Call the handler with the batch in its format; its result as columns."""
        if self.batch_format == "columns":
            return normalise(self.target(batch.columns()))
        if self.batch_format == "dataframe":
            return normalise(self.target(to_dataframe(batch.messages())))
        return normalise(self.target(batch.messages()))


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def available() -> dict[str, str]:
    """Installed handler names → where they come from."""
    return {name: _origin(ep) for name, ep in _entry_points().items()}


def _origin(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"{ep.value} ({dist.name} {dist.version})" if dist else ep.value


# Distribution name → its version when this process first loaded a handler from it.
_imported: dict[str, str] = {}


def _imported_version(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "", ""
    return dist.name, _imported.setdefault(dist.name, dist.version)


def upgraded(handlers: Iterable[LoadedHandler]) -> list[tuple[LoadedHandler, str]]:
    """(handler, version on disk) of each handler whose package now has another version
    installed than the one it runs (read afresh from the installed metadata)."""
    installed = {name: ep.dist.version for name, ep in _entry_points().items() if ep.dist}
    return [(handler, installed[handler.name]) for handler in handlers
            if handler.distribution and handler.name in installed
            and installed[handler.name] != handler.version]


def load(name: str, options: Mapping[str, Any] | None = None) -> LoadedHandler:
    """Import a handler; a class is instantiated with the flow's `options` table."""
    ep = _entry_points().get(name)
    if ep is None:
        raise PluginError(f'no handler named "{name}" in entry-point group "{GROUP}"')
    try:
        target = ep.load()
    except Exception as exc:  # a broken plugin must name itself, whatever it raised
        raise PluginError(f'handler "{name}" ({ep.value}) failed to import: {exc!r}') from exc
    if isinstance(target, type):
        try:
            target = target(**dict(options or {}))
        except TypeError as exc:
            raise PluginError(f'handler "{name}" rejected its options: {exc}',
                              key="options") from exc
    elif options:
        raise PluginError(f'handler "{name}" is not a class, so it takes no options',
                          key="options")
    if not callable(target):
        raise PluginError(f'handler "{name}" ({ep.value}) is not callable')
    try:
        cpu_bound, batch_format = traits(target)
    except ValueError as exc:
        raise PluginError(f'handler "{name}": {exc}') from exc
    distribution, version = _imported_version(ep)
    origin = f"{ep.value} ({distribution} {version})" if distribution else ep.value
    return LoadedHandler(name, target, cpu_bound, batch_format, origin, distribution, version)


def load_for_flow(flow: FlowConfig, path: Path | str) -> LoadedHandler:
    """`flow`'s handler, with its options and `cpu_bound` setting applied; a handler that
    cannot be used is a config error naming the file, the flow and the key."""
    try:
        handler = load(flow.handler, flow.options)
    except PluginError as exc:
        raise ConfigError(path, str(exc), flow=flow.name, key=exc.key) from None
    if flow.cpu_bound is not None:
        handler = dataclasses.replace(handler, cpu_bound=flow.cpu_bound)
    return handler


# In a pool process: handlers are loaded by name once per process, never pickled.
_worker_handlers: dict[tuple[str, tuple[tuple[str, Any], ...]], LoadedHandler] = {}


def run_in_worker(name: str, options: tuple[tuple[str, Any], ...],
                  entries: list[tuple[str, list[bytes]]]) -> tuple[list, dict, list]:
    """Process-pool entry: entries as read (id, flat bytes) in, plain lists out. Decoding
    happens here too, so it is shared by the pool's processes."""
    key = (name, options)
    handler = _worker_handlers.get(key)
    if handler is None:
        handler = _worker_handlers[key] = load(name, dict(options))
    outcome = handler.run(Decoded(entries))
    return outcome.columns.ids, outcome.columns.data, outcome.rejections
