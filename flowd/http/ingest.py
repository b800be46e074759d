"""`POST /v1/streams/{stream}`: the message hub over HTTP.

Guarantees:
- a request is written whole, by one server-side script, or not at all: a bad record
  (400), a body over the limit (413), a stream without room for all of it (429) or a
  Redis that does not answer (503) write nothing;
- the body is read with a size limit and a deadline as it arrives, never buffered past
  `max_body_bytes`; a client slower than `body_timeout_s` gets 408 and is cut off;
- with an `Idempotency-Key` the key is recorded in the same script as the entries, for
  `idempotency_window_s`: a retry gets the first answer (the same ids) and writes nothing;
- with tokens configured, a request needs a bearer token allowed the stream (401 / 403);
  a token's value never reaches a log, a metric or an answer. The tokens' values are read
  when this is made, that is when the HTTP server starts (flowd.http.auth.resolve): one that
  is missing is a ConfigError naming its key, before anything is served.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import orjson
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
import structlog
from aiohttp import web

from flowd.core.config import Config
from flowd.core.keys import slot_tag
from flowd.core.lua import Lua
from flowd.core.replies import text
from flowd.http.auth import Bearer, bearer_token, resolve
from flowd.publish import InvalidRecord, checked, entry_limit, known_streams, stream_limit

__all__ = ["INGEST", "Ingest", "idempotency_key"]

log = structlog.get_logger(__name__)

RETRY_AFTER_S = 1  # what a 429 or 503 asks the client to wait
MAX_KEY_LENGTH = 200

# KEYS: the stream, the idempotency key (the stream again when none). ARGV: max_len ("" for
# none), window (ms), "1" with a key, the records (MessagePack: one flat array each).
INGEST = Lua(r"""
if ARGV[3] == '1' then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {'seen', seen} end
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'stream' and kind ~= 'none' then return {'wrongtype', kind} end
local records = cmsgpack.unpack(ARGV[4])
if ARGV[1] ~= '' then
  local length = redis.call('XLEN', KEYS[1])
  if length + #records > tonumber(ARGV[1]) then return {'full', tostring(length)} end
end
local ids = {}
for i = 1, #records do ids[i] = redis.call('XADD', KEYS[1], '*', unpack(records[i])) end
local answer = table.concat(ids, ',')
if ARGV[3] == '1' then redis.call('SET', KEYS[2], answer, 'PX', ARGV[2]) end
return {'ok', answer}
""")


def idempotency_key(stream: str, key: str) -> str:
    """Where a request's key is kept: next to its stream (one cluster slot)."""
    return f"flowd:idem:{{{slot_tag(stream)}}}:{stream}:{key}"


def _problem(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else \
        {"WWW-Authenticate": 'Bearer realm="flowd"'} if status == 401 else None
    return web.json_response({"error": message, **extra}, status=status, headers=headers,
                             dumps=lambda v: orjson.dumps(v).decode())


class Ingest:
    def __init__(self, config: Config, redis: aioredis.Redis) -> None:
        self.config = config
        self.http = config.http
        self.bearers: tuple[Bearer, ...] = resolve(config)  # read now: serving starts
        self.redis = redis
        self.known = known_streams(config)

    async def close(self) -> None:
        await self.redis.aclose()

    async def handle(self, request: web.Request) -> web.Response:
        stream = request.match_info["stream"]
        if (denied := self._authorize(request, stream)) is not None:
            return denied
        if stream not in self.known and not self.http.any_stream:
            return _problem(404, f"stream {stream!r} is not read or written by any flow")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (0 < len(key) <= MAX_KEY_LENGTH and key.isprintable()):
            return _problem(400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable "
                                 "characters")
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            records = self._records(body, stream)
        except InvalidRecord as exc:
            return _problem(400, f"{exc.problem}; nothing was written", position=exc.position,
                            key=exc.key)
        return await self._write(stream, records, key)

    def _authorize(self, request: web.Request, stream: str) -> web.Response | None:
        if not self.bearers:
            return None
        token = bearer_token(self.bearers, request)
        if token is None:
            return _problem(401, "a valid bearer token is required (Authorization: Bearer …)")
        if "*" not in token.streams and stream not in token.streams:
            return _problem(403, f"token {token.name!r} may not post to stream {stream!r}")
        return None

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        limit = self.http.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _problem(413, f"body of {request.content_length} bytes is over the "
                                 f"limit of {limit} bytes")
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.http.body_timeout_s):
                async for chunk in request.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > limit:
                        answer = _problem(413, f"body over the limit of {limit} bytes")
                        answer.force_close()  # the rest of the body is not read
                        return answer
                    parts.append(chunk)
        except TimeoutError:
            answer = _problem(408, f"body not received within {self.http.body_timeout_s} s")
            answer.force_close()  # a slow client is cut off, not waited for
            return answer
        return b"".join(parts)

    def _records(self, body: bytes, stream: str) -> list[dict[Any, Any]]:
        limit = entry_limit(self.config, stream)  # as `flowd send` (flowd.publish)
        if body.lstrip()[:1] == b"[":
            try:
                items = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InvalidRecord("body", f"not valid JSON (or not UTF-8): {exc}") from None
            numbered = [(f"record {n}", item) for n, item in enumerate(items, 1)]
        else:
            numbered = []
            for n, line in enumerate(body.split(b"\n"), 1):
                if line.strip():
                    try:
                        numbered.append((f"line {n}", orjson.loads(line)))
                    except orjson.JSONDecodeError as exc:
                        raise InvalidRecord(f"line {n}", f"not valid JSON (or not UTF-8): "
                                                         f"{exc}") from None
        if not numbered:
            raise InvalidRecord("body", "holds no records (a JSON array of objects, or "
                                        "NDJSON: one object per line)")
        return [checked(item, position, limit) for position, item in numbered]

    async def _write(self, stream: str, records: list[dict[Any, Any]],
                     key: str | None) -> web.Response:
        max_len = stream_limit(self.config, stream)
        packed = msgpack.packb([[item for pair in fields.items() for item in pair]
                                for fields in records], use_bin_type=False)
        try:
            state, answer = await INGEST(
                self.redis, [stream, idempotency_key(stream, key) if key else stream],
                ["" if max_len is None else str(max_len), self.http.idempotency_window_s * 1000,
                 "1" if key else "0", packed])
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            log.warning("ingest: Redis does not answer", stream=stream, error=str(exc))
            return _problem(503, "Redis does not answer; nothing was written")
        state, answer = text(state), text(answer)
        if state == "full":
            return _problem(429, f"stream {stream!r} holds {answer} entries; {len(records)} "
                                 f"more would pass its max_len {max_len}; nothing was written",
                            written=0)
        if state == "wrongtype":
            return _problem(409, f"key {stream!r} holds a {answer}, not a stream; nothing "
                                 "was written")
        ids = answer.split(",") if answer else []
        return web.json_response({"written": len(ids), "ids": ids,
                                  "replayed": state == "seen"},
                                 dumps=lambda v: orjson.dumps(v).decode())

