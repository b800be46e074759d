"""One exception tree: every error flowd raises is a FlowdError, and its branch (transient,
data, configuration) is what flowd.core.retry and a user's `except` go by."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.exceptions as redis_errors
from clickhouse_driver import errors as ch_errors

import flowd
from flowd import ConfigurationError, DataError, FlowdError, TransientError
from flowd.admin.status import RedisUnreachable
from flowd.core.connections import ClickHouseAuthFailed
from flowd.core.errors import (
    CoercionError,
    ConfigError,
    HostUnavailable,
    NotRecorded,
    OutcomeUnknown,
    OwnershipExpired,
    PluginError,
    TableMissing,
)
from flowd.core.retry import is_data_error, is_transient, retry_at_once, retry_sync

BRANCHES = (TransientError, DataError, ConfigurationError)
# Failures reported as they are: their cause decides what they mean, not their class.
AS_THEY_ARE = {"PublishError", "QueryError", "DemoError", "Refused", "_Stopped"}


def flowd_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the flowd package."""
    found: dict[str, type[BaseException]] = {}
    for module_info in pkgutil.walk_packages(flowd.__path__, "flowd."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) \
                    and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_flowd_defines_is_a_flowd_error_in_one_branch() -> None:
    found = flowd_exceptions()
    assert len(found) >= 20  # the walk found the package, not an empty list
    for name, cls in found.items():
        assert issubclass(cls, FlowdError), f"{name} is not a FlowdError"
        if cls in (FlowdError, *BRANCHES) or cls.__name__ in AS_THEY_ARE:
            continue
        branches = [branch.__name__ for branch in BRANCHES if issubclass(cls, branch)]
        assert len(branches) == 1, f"{name} is in {branches or 'no branch'}"


def auth_refused() -> ClickHouseAuthFailed:
    return ClickHouseAuthFailed("clickhouse at ch:9000 refused user flowd", code=516)


# (error, is_transient, is_data_error, retried at once by the retry policy)
CLASSIFIED: list[tuple[Callable[[], BaseException], bool, bool, bool]] = [
    # flowd's own, by branch
    (lambda: NotRecorded("insert not sent"), True, False, True),
    (lambda: HostUnavailable("ch-2:9000 does not answer"), True, False, True),
    (lambda: RedisUnreachable("cannot reach Redis"), True, False, True),
    (lambda: flowd.StreamFull("s", 10, 10), True, False, True),
    (lambda: OutcomeUnknown("insert into t: timed out"), True, False, False),
    (lambda: OwnershipExpired("query not sent"), True, False, False),
    (lambda: CoercionError("'x' is not an integer"), False, True, False),
    (lambda: flowd.InvalidRecord("record 1", "has no fields"), False, True, False),
    (lambda: ConfigError("flowd.toml", "bad key"), False, False, False),
    (lambda: PluginError("no handler named x"), False, False, False),
    (lambda: TableMissing("db.t", "clickhouse", "UNKNOWN_TABLE"), False, False, False),
    # a refused login is configuration, and still waited for like an outage
    (auth_refused, True, False, False),
    # the drivers' errors, by type and code, as before
    (lambda: ch_errors.NetworkError("connection refused"), True, False, True),
    (lambda: ch_errors.ServerException("TYPE_MISMATCH", code=53), False, True, False),
    (lambda: ch_errors.ServerException("TOO_MANY_PARTS", code=252), True, False, True),
    (lambda: redis_errors.ConnectionError("refused"), True, False, True),
    (lambda: redis_errors.ResponseError("WRONGTYPE not a stream"), False, False, False),
    (lambda: TimeoutError("timed out"), True, False, True),
    (lambda: ValueError("bad value"), False, True, False),
    (lambda: struct.error("bad pack"), False, True, False),
]


@pytest.mark.parametrize(("make", "transient", "data", "at_once"), CLASSIFIED,
                         ids=[type(make()).__name__ + f"-{n}"
                              for n, (make, *_) in enumerate(CLASSIFIED)])
def test_each_error_is_classified_by_its_branch_or_by_the_driver(
        make: Callable[[], BaseException], transient: bool, data: bool, at_once: bool) -> None:
    exc = make()
    assert is_transient(exc) is transient
    assert is_data_error(exc) is data
    assert retry_at_once(exc) is at_once


def attempts_until(exc: BaseException) -> int:
    """How many times retry_sync calls a function that fails once with `exc`, then works."""
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise exc
        return "done"

    with contextlib.suppress(FlowdError):  # not retried: the one call is counted
        assert retry_sync("test", flaky) == "done"
    return calls


def test_the_retry_policy_repeats_an_unsent_insert_but_never_one_whose_answer_was_lost() -> None:
    assert attempts_until(NotRecorded("insert not sent")) == 2
    assert attempts_until(OutcomeUnknown("timed out")) == 1
    assert attempts_until(TableMissing("db.t", "clickhouse", "UNKNOWN_TABLE")) == 1


def test_a_publisher_catches_every_refusal_as_a_flowd_error_by_its_branch(
        r: redis.Redis) -> None:
    with pytest.raises(DataError) as bad:
        flowd.publish(r, "errors.s", [{"n": 1}, {"n": {"nested": True}}])
    assert isinstance(bad.value, FlowdError) and r.xlen("errors.s") == 0

    r.xadd("errors.full", {"n": 0})
    with pytest.raises(TransientError) as full:
        flowd.publish(r, "errors.full", [{"n": 1}], max_len=1)
    assert isinstance(full.value, flowd.StreamFull) and r.xlen("errors.full") == 1

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    nowhere = redis.Redis(port=port, socket_connect_timeout=1)
    with pytest.raises(FlowdError) as down:
        flowd.publish(nowhere, "errors.s", [{"n": 1}])
    assert isinstance(down.value, flowd.PublishError) and down.value.written == 0


def test_a_config_that_cannot_load_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "flowd.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:1"\n[[flow]]\nname = "x"\n')
    with pytest.raises(ConfigurationError) as refused:
        flowd.load(path)
    assert isinstance(refused.value, ConfigError) and str(path) in str(refused.value)


def test_the_command_line_reports_a_flowd_error_in_one_line_without_a_trace(
        tmp_path: Path) -> None:
    """An embedded server that cannot start (its directory is a file) is a FlowdError: the
    command says why on one line and exits 1."""
    taken = tmp_path / "not-a-directory"
    taken.write_text("")
    config = tmp_path / "flowd.toml"
    config.write_text(f'[redis]\nurl = "embedded://{taken}"\n\n[clickhouse]\nhost = "127.0.0.1"\n')
    done = subprocess.run([sys.executable, "-m", "flowd", "status", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("flowd: embedded"), done.stderr
    assert "Traceback" not in done.stderr
