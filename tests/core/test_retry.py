"""The one retry policy (flowd.core.retry), on errors real servers give: a transient error
(a server down, Redis out of memory) is retried with growing waits until it passes or the
policy gives up; an error in the data, or a refused login, is not retried at once."""

from __future__ import annotations

import asyncio

import pytest
import redis
import servers
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from flowd.core import retry
from flowd.core.retry import is_data_error, is_transient, needs_operator, retry_async, retry_sync


class Calls:
    """A function failing with what `fail` raises for its first `failures` calls."""

    def __init__(self, failures: int, fail: object, then: object = "done") -> None:
        self.failures, self.fail, self.then = failures, fail, then
        self.count = 0

    def __call__(self) -> object:
        self.count += 1
        if self.count <= self.failures:
            return self.fail()  # type: ignore[operator]
        return self.then


def refused() -> None:
    """A real refused connection: nothing listens on the port (no retries of the client's
    own, as flowd's clients have none)."""
    redis.Redis(port=servers.free_port(), retry=Retry(NoBackoff(), 0)).ping()


def test_a_server_that_comes_back_is_retried_with_growing_waits() -> None:
    calls = Calls(2, refused)

    async def attempt() -> object:
        return calls()

    with capture_logs() as logs:
        assert asyncio.run(retry_async("ping", attempt)) == "done"
    assert calls.count == 3
    waits = [event["wait_s"] for event in logs if event["event"] == "retrying"]
    # Exponential from 0.1 s, jitter on top: each wait at least double the first's floor.
    assert len(waits) == 2 and waits[0] >= 0.1 and waits[1] >= 0.2


def test_a_server_down_for_good_is_given_up_on_with_its_own_error() -> None:
    calls = Calls(99, refused)
    with pytest.raises(redis.ConnectionError):
        retry_sync("ping", calls)
    assert calls.count == retry.ATTEMPTS


def test_redis_out_of_memory_is_waited_for_not_blamed_on_the_entries(r: redis.Redis) -> None:
    policy, limit = r.config_get("maxmemory-policy"), r.config_get("maxmemory")
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    refusals: list[BaseException] = []

    def write() -> bool:
        try:
            return bool(r.set("k", "v"))
        except redis.OutOfMemoryError as exc:
            refusals.append(exc)
            r.config_set("maxmemory", 0)  # memory freed before the next attempt
            raise

    try:
        assert retry_sync("set", write)
    finally:
        r.config_set("maxmemory", limit["maxmemory"])
        r.config_set("maxmemory-policy", policy["maxmemory-policy"])
    [refusal] = refusals
    assert is_transient(refusal) and not is_data_error(refusal)
    assert r.get("k") == "v"


def test_a_value_clickhouse_cannot_parse_fails_at_once_as_the_datas_fault(
        clickhouse_server: servers.Server) -> None:
    client = Client(host=clickhouse_server.host, port=clickhouse_server.port)
    calls = Calls(99, lambda: client.execute("SELECT toInt32('not a number')"))
    try:
        with pytest.raises(ch_errors.ServerException) as raised:
            retry_sync("select", calls)
    finally:
        client.disconnect()
    assert calls.count == 1
    assert is_data_error(raised.value) and not is_transient(raised.value)


def test_a_refused_login_waits_for_the_operator_but_is_not_retried_at_once(
        clickhouse_server: servers.Server) -> None:
    client = Client(host=clickhouse_server.host, port=clickhouse_server.port,
                    user="nobody_here", password="wrong")
    calls = Calls(99, lambda: client.execute("SELECT 1"))
    with pytest.raises(ch_errors.ServerException) as raised:
        retry_sync("login", calls)
    assert calls.count == 1
    # transient: the batch stays pending (not dead-lettered) until the password is fixed
    assert is_transient(raised.value) and needs_operator(raised.value)
    assert not is_data_error(raised.value)
