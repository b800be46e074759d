"""The OpenAPI 3 document of flowd's HTTP API, served at `/openapi.json`.

Kept next to the code that answers (flowd.ingest, flowd.httpserver) and tested against it
by a fuzz run (tests/test_http_fuzz.py): every status it lists is one the server gives.
"""

from __future__ import annotations

from typing import Any

from flowd import __version__

__all__ = ["document"]

_FLAT = {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_PROBLEM = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what went wrong, and that nothing was "
                                                   "written"},
        "position": {"type": "string", "description": 'the first bad record: "record N" '
                                                      '(array) or "line N" (NDJSON)'},
        "key": {"type": "string", "nullable": True, "description": "its bad field, if one is"},
        "written": {"type": "integer"},
    },
}


def _problem(description: str, retry: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    if retry:
        answer["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                             "description": "seconds to wait"}}
    return answer


def _post() -> dict[str, Any]:
    records = {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Record"}}
    return {
        "summary": "Append flat records to a stream, all of them or none",
        "operationId": "postRecords",
        "parameters": [
            {"name": "stream", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "description": "a retry with the same key writes nothing and gets the first "
                            "answer back (kept idempotency_window_s)",
             "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
        ],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": records},
            "application/x-ndjson": {"schema": {
                "type": "string", "description": "one JSON object per line"}},
        }},
        "responses": {
            "200": {"description": "every record written, in order", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Written"}}}},
            "400": _problem("a bad record (nested value, null, not an object, not UTF-8, "
                            "over max_entry_bytes) or a bad header; nothing written"),
            "401": _problem("tokens are configured and none valid was given"),
            "403": _problem("the token may not post to this stream"),
            "404": _problem("no flow reads or writes this stream"),
            "408": _problem("the body did not arrive within body_timeout_s"),
            "409": _problem("the key holds something that is not a stream"),
            "413": _problem("the body is over max_body_bytes"),
            "429": _problem("the stream has no room for all the records (its max_len); "
                            "nothing written", retry=True),
            "503": _problem("Redis does not answer; nothing written", retry=True),
        },
    }


def document() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "flowd", "version": __version__,
                 "description": "The message hub over HTTP: flat records into Redis streams."},
        "paths": {
            "/v1/streams/{stream}": {"post": _post()},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                                 "responses": {"200": {"description": "exposition",
                                                       "content": text}}}},
            "/healthz": {"get": {"summary": "Every server answers", "operationId": "health",
                                 "responses": {"200": {"description": "healthy",
                                                       "content": text},
                                               "503": {"description": "a server does not "
                                                       "answer", "content": text}}}},
        },
        "components": {
            "schemas": {
                "Record": {"type": "object", "minProperties": 1, "additionalProperties": _FLAT},
                "Written": {"type": "object", "required": ["written", "ids", "replayed"],
                            "properties": {"written": {"type": "integer"},
                                           "ids": {"type": "array",
                                                   "items": {"type": "string"}},
                                           "replayed": {"type": "boolean"}}},
                "Problem": _PROBLEM,
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
