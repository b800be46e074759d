"""The console's requests and answers: JSON bodies, problems, and the checks of what a
request asks for (a count, the ids of dead letters), each failing as a `Refused` answer
before anything is changed."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from aiohttp import web

from flowd.core.errors import FlowdError

__all__ = ["DEFAULT_COUNT", "MAX_COUNT", "MAX_IDS", "Refused", "answer", "count_asked",
           "ids_asked", "problem", "read_body"]

MAX_IDS = 1000  # dead letters named in one replay or purge
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 10.0
DEFAULT_COUNT, MAX_COUNT = 100, 1000  # dead letters listed in one answer
_ID = re.compile(r"\d+-\d+")


class Refused(FlowdError):
    """A request answered with a problem, before anything was changed."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


def answer(value: Any, status: int = 200) -> web.Response:
    """`value` as JSON, never cached: every figure is read when asked."""
    response = web.Response(body=orjson.dumps(value), status=status,
                            content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def problem(status: int, message: str, **extra: Any) -> web.Response:
    response = answer({"error": message, **extra}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="flowd"'
    return response


def count_asked(raw: str | None) -> int:
    """How many dead letters `?count=` asks for."""
    if raw is None:
        return DEFAULT_COUNT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_COUNT:
        raise Refused(400, f"count must be a whole number from 1 to {MAX_COUNT}")
    return int(raw)


async def read_body(request: web.Request) -> bytes:
    """The whole body, refused when too big or too slow to arrive."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise Refused(400, f"body over {MAX_BODY_BYTES} bytes")
    parts, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.content.iter_chunked(65536):
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise Refused(400, f"body over {MAX_BODY_BYTES} bytes")
                parts.append(chunk)
    except TimeoutError:
        raise Refused(400, f"body not received within {BODY_TIMEOUT_S:g} s") from None
    return b"".join(parts)


def ids_asked(body: bytes) -> list[str]:
    """The ids of a replay or purge body: {"ids": ["1700000000000-0", ...]}."""
    try:
        data = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError as exc:
        raise Refused(400, f"body is not valid JSON: {exc}") from None
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids:
        raise Refused(400, 'body must be {"ids": ["ID", ...]}: the dead letters to act on, '
                           "by id (there is no \"all\")")
    if len(ids) > MAX_IDS:
        raise Refused(400, f"at most {MAX_IDS} ids in one request")
    if bad := [i for i in ids if not isinstance(i, str) or not _ID.fullmatch(i)]:
        raise Refused(400, f"not a stream id (like 1700000000000-0): "
                           f"{', '.join(map(str, bad[:20]))}")
    return list(dict.fromkeys(ids))
