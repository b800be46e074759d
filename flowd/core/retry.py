"""Which errors are worth retrying, and the one retry policy flowd uses for them.

A transient error (a server restarting, a network blip, ClickHouse asking to slow down) is
retried with capped exponential backoff and jitter; anything else fails at once, because
retrying a bad request only delays the dead letter. flowd's own errors are classified by
their branch of the tree in flowd.core.errors; the drivers' by their type and code.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions as redis_errors
import structlog
from clickhouse_driver import errors as ch_errors
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from flowd.core.errors import (
    DataError,
    FlowdError,
    TransientError,
)

__all__ = ["AUTH_CLICKHOUSE_CODES", "Backoff", "describe", "is_auth_error", "is_data_error",
           "is_transient", "needs_operator", "retry_async", "retry_at_once", "retry_sync"]

log = structlog.get_logger(__name__)

T = TypeVar("T")


def describe(exc: BaseException) -> str:
    """An error for a log line: its type and its message.

    repr() is not enough: redis-py's errors repr as their category alone
    ("network:ConnectionError"), hiding the reason (refused, certificate rejected…).
    """
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

# ClickHouse server codes that mean "try again later", not "your data is wrong".
TRANSIENT_CLICKHOUSE_CODES = frozenset({
    3,    # UNEXPECTED_END_OF_FILE
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY (replica in read-only mode while it reconnects to Keeper)
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    252,  # TOO_MANY_PARTS
    285,  # TOO_FEW_LIVE_REPLICAS
    319,  # UNKNOWN_STATUS_OF_INSERT
    425,  # SYSTEM_ERROR
    999,  # KEEPER_EXCEPTION
})

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,  # refused / reset / aborted
    TimeoutError,
    socket.timeout,
    EOFError,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    # Redis Cluster mid-failover or resharding: a slot without a master yet, or a slot
    # that moved. A MOVED/ASK reply inside MULTI aborts the whole EXEC, so nothing ran.
    redis_errors.SlotNotCoveredError,
    redis_errors.AskError,  # MovedError is one
    # maxmemory reached under noeviction ("OOM command not allowed…"): the command was
    # refused, nothing of it ran (a script is refused only before its first write). A wait
    # until memory is freed, never the data's fault: no split, no dead letter.
    redis_errors.OutOfMemoryError,
    ch_errors.NetworkError,
    ch_errors.SocketTimeoutError,
)


# ClickHouse codes blaming the data of an insert, not the server or the config: a batch
# failing with one of these is split to find the entry at fault.
DATA_CLICKHOUSE_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    26,   # CANNOT_PARSE_QUOTED_STRING
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
})


def is_data_error(exc: BaseException) -> bool:
    """The entries are to blame (so isolate them), not an outage or the config."""
    if isinstance(exc, FlowdError):
        return isinstance(exc, DataError)
    if isinstance(exc, ch_errors.Error) and getattr(exc, "code", None) is not None:
        return exc.code in DATA_CLICKHOUSE_CODES
    return isinstance(exc, (ValueError, TypeError, OverflowError, struct.error))


# ClickHouse codes saying the server refused the login itself (who, or from where).
AUTH_CLICKHOUSE_CODES = frozenset({
    192,  # UNKNOWN_USER
    193,  # WRONG_PASSWORD
    194,  # REQUIRED_PASSWORD
    195,  # IP_ADDRESS_NOT_ALLOWED
    516,  # AUTHENTICATION_FAILED (newer servers say this for a wrong user or password)
})


def is_auth_error(exc: BaseException) -> bool:
    """ClickHouse refused the login: only the operator can fix it (the password in the
    environment or the credentials store, the user, the server's users.xml)."""
    return isinstance(exc, ch_errors.ServerException) and exc.code in AUTH_CLICKHOUSE_CODES


def needs_operator(exc: BaseException) -> bool:
    """Trying again at once cannot help: a refused login, or a server certificate that
    `ca_certs` does not vouch for (Redis or ClickHouse). Still transient: the batch waits
    for the operator's fix, it is not dead-lettered."""
    return is_auth_error(exc) or "CERTIFICATE_VERIFY_FAILED" in str(exc)


def is_transient(exc: BaseException) -> bool:
    """Worth waiting for: the batch stays pending and is tried again later.

    A refused login counts: the operator may fix the password and restart (or the server's
    users.xml), and nothing is dead-lettered meanwhile. The retry policy below does not
    retry it at once, though (`needs_operator`): the same password fails the same way a
    second later. Of flowd's own errors, a TransientError counts (flowd.core.errors).
    """
    if is_auth_error(exc):
        return True
    if isinstance(exc, FlowdError):
        return isinstance(exc, TransientError)
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if isinstance(exc, ch_errors.ServerException):
        return exc.code in TRANSIENT_CLICKHOUSE_CODES
    if isinstance(exc, redis_errors.ResponseError):
        # LOADING / MASTERDOWN / READONLY replies during a failover.
        return str(exc).split(" ", 1)[0] in {"LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN"}
    if isinstance(exc, redis_errors.RedisClusterException):
        # Raised when no node of the cluster answers while mapping its slots.
        return "cannot be connected" in str(exc)
    if isinstance(exc, redis_errors.ClusterError):
        # The cluster client gave up following redirects (MOVED, ASK, TRYAGAIN): a slot
        # half-way through a migration, or a failover not settled yet.
        return "TTL exhausted" in str(exc)
    return isinstance(exc, OSError)  # EHOSTUNREACH, ENETUNREACH and friends


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("retrying", what=what, attempt=state.attempt_number,
                    wait_s=round(state.upcoming_sleep, 2), error=describe(exc))
    return before_sleep


# Bounded on purpose: after this the batch stays pending and the consumer backs off,
# so a long outage does not pin one batch in a retry loop while shutdown waits.
ATTEMPTS = 6
MAX_DELAY_S = 20.0


def retry_at_once(exc: BaseException) -> bool:
    """Worth trying again now (with backoff): transient, and neither waiting for the operator
    nor one of flowd's errors that must not be repeated as is (OutcomeUnknown: a blind retry
    could write twice)."""
    if isinstance(exc, TransientError) and not exc.retry_at_once:
        return False
    return is_transient(exc) and not needs_operator(exc)


def _policy(what: str) -> dict:
    return {
        "retry": retry_if_exception(retry_at_once),
        "wait": wait_exponential_jitter(initial=0.1, max=5.0, jitter=0.5),
        "stop": stop_after_attempt(ATTEMPTS) | stop_after_delay(MAX_DELAY_S),
        "before_sleep": _log_retry(what),
        "reraise": True,
    }


def retry_sync(what: str, fn: Callable[[], T]) -> T:
    return Retrying(**_policy(what))(fn)


async def retry_async(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    async for attempt in AsyncRetrying(**_policy(what)):
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity re-raises the last error")


class Backoff:
    """Capped exponential delay between failed batches, reset on success."""

    def __init__(self, initial: float = 0.2, cap: float = 30.0) -> None:
        self.initial, self.cap = initial, cap
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return min(self.cap, self.initial * 2 ** (self.failures - 1))

    def reset(self) -> None:
        self.failures = 0
