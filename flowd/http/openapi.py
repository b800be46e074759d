"""The OpenAPI 3 document of flowd's HTTP API, served at `/openapi.json`.

Kept next to the code that answers (flowd.http.ingest, flowd.http.console, flowd.http.server) and
tested against it
by a fuzz run (tests/http/test_http_fuzz.py): every status it lists is one the server gives.
The console's routes (`/console`, `/v1/flows`...) are documented by `console_paths`.
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


def _unauthorized(description: str) -> dict[str, Any]:
    return {**_problem(description), "headers": {"WWW-Authenticate": {
        "schema": {"type": "string"}, "description": 'Bearer realm="flowd"'}}}


def _post() -> dict[str, Any]:
    records = {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Record"}}
    return {
        "summary": "Append flat records to a stream, all of them or none",
        "operationId": "postRecords",
        # Optional ({}): with no token configured (a loopback address) anyone may post.
        "security": [{"bearer": []}, {}],
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
            "401": _unauthorized("tokens are configured and none valid was given"),
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


def _json_answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_FLOW_PARAMETER = {"name": "flow", "in": "path", "required": True,
                   "description": "the flow's name in the config",
                   "schema": {"type": "string", "minLength": 1}}
_REFUSALS = {
    "401": _unauthorized("no Authorization: Bearer …, or a token that matches none; "
                         "nothing changed"),
    "403": _problem("the token has no control = true, or no token has (the console is "
                    "read-only); nothing changed"),
}


def _get(summary: str, operation: str, answer: str, schema: str,
         parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A reading route. Without parameters, a route of figures: open to anyone. With them,
    the dead letters, which hold message data: a read token once any token is configured."""
    responses = {"200": _json_answer(answer, schema),
                 "503": _problem("a Redis that is needed does not answer")}
    get: dict[str, Any] = {"summary": summary, "operationId": operation,
                           "parameters": parameters or [], "responses": responses}
    if parameters:
        responses["400"] = _problem("a bad query parameter")
        responses["401"] = _unauthorized(
            "tokens are configured and no Authorization: Bearer … of one was given; the "
            "answer holds no message data")
        responses["403"] = _problem("the token has neither read = true nor control = true; "
                                    "the answer holds no message data")
        responses["404"] = _problem("no such flow, or it has no dead-letter stream")
        responses["409"] = _problem("a key holds something that is not a stream")
        # Optional ({}): with no token configured (a loopback address) the route is open.
        get["security"] = [{"bearer": []}, {}]
        get["description"] = ("Holds message data (fields and reasons): once any "
                              "[http.tokens.NAME] is configured, it needs a bearer token "
                              "with read = true or control = true.")
    else:
        get["security"] = []  # figures only, no message data: open
    return {"get": get}


def _daemons() -> dict[str, Any]:
    operation = _get("The registry of daemons (as flowd status --daemons --json): the "
                     "live ones and those seen in the last hour", "listDaemons",
                     "the daemons, oldest start first", "Daemons")
    operation["get"]["parameters"] = [{
        "name": "all", "in": "query", "required": False,
        "description": "1: also the daemons stopped or gone over an hour ago",
        "schema": {"type": "string", "enum": ["1"]}}]
    return operation


def _change(summary: str, operation: str, answer: str, schema: str, *,
            ids: bool) -> dict[str, Any]:
    responses = {"200": _json_answer(answer, schema), **_REFUSALS,
                 "404": _problem("no such flow (or, for dead letters, it has none, or an id "
                                 "is not one of its dead letters); nothing changed"),
                 "409": _problem("a key holds something else than flowd wrote there"),
                 "503": _problem("the flow's Redis does not answer", retry=False)}
    change: dict[str, Any] = {"summary": summary, "operationId": operation,
                              "parameters": [_FLOW_PARAMETER], "security": [{"bearer": []}],
                              "responses": responses}
    if ids:
        responses["400"] = _problem('a body that is not {"ids": [ID, ...]} (1 to 1000 stream '
                                    "ids); nothing changed")
        change["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Ids"}}}}
    return {"post": change}


def console_paths() -> dict[str, Any]:
    """The web console's page and its JSON API (flowd.http.console)."""
    count = {"name": "count", "in": "query", "required": False,
             "description": "how many dead letters, oldest first (100 when absent)",
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}
    paths: dict[str, Any] = {
        "/console": {"get": {"summary": "The web console (a page; its assets under "
                                        "/console/)", "operationId": "console",
                             "security": [],
                             "responses": {"200": {"description": "the page", "content": {
                                 "text/html": {"schema": {"type": "string"}}}}}}},
        "/v1/flows": _get("Every flow's figures (as flowd status --json), rate, desired "
                          "state and the daemons running it", "listFlows",
                          "the flows, in config order", "Flows"),
        "/v1/daemons": _daemons(),
        "/v1/rates": {"get": {
            "summary": "Each flow's rate (entries acked per second) as the serving daemon "
                       "sampled it from the registry, for the last 5 minutes",
            "operationId": "listRates", "parameters": [],
            "responses": {"200": _json_answer("[unix time, rate or null] per sample, oldest "
                                              "first", "Rates")}}},
        "/v1/graph": _get("The data-flow graph: servers, streams, flows, tables, edges",
                          "graph", "the graph, with live lag and pending where Redis "
                                   "answered", "Graph"),
        "/v1/flows/{flow}/dead-letters": _get(
            "A flow's dead letters, oldest first: fields and reason", "listDeadLetters",
            "the dead letters", "DeadLetters", [_FLOW_PARAMETER, count]),
        "/v1/flows/{flow}/dead-letters/replay": _change(
            "Send dead letters back to the flow's source stream, each exactly once",
            "replayDeadLetters", "how many were sent back", "Replayed", ids=True),
        "/v1/flows/{flow}/dead-letters/purge": _change(
            "Delete dead letters, named by id", "purgeDeadLetters", "how many were deleted",
            "Purged", ids=True),
    }
    for action, state in (("pause", "paused"), ("resume", "running"),
                          ("drain", "draining")):
        paths[f"/v1/flows/{{flow}}/{action}"] = _change(
            f"Ask every daemon running the flow to follow the state {state!r}",
            f"{action}Flow", "the state asked for, by whom and when", "Steered", ids=False)
    paths.update(_scheduled_paths())
    return paths


def _scheduled_paths() -> dict[str, Any]:
    """The [[source]]s' and [[move]]s' routes."""
    paths: dict[str, Any] = {}
    paths["/v1/sources"] = _get("Every [[source]]'s state (as flowd status --json gives "
                                "it): cursor, lag, rows, last run, next run", "listSources",
                                "the sources, in config order", "Sources")
    for action, state in (("pause", "paused"), ("resume", "running"),
                          ("drain", "draining")):
        paths[f"/v1/sources/{{source}}/{action}"] = _scheduled_change("source", action, state)
    paths["/v1/moves"] = _get("Every [[move]]'s state (as flowd status --json gives it): "
                              "partitions moved, rows moved, partitions in hand and stuck, "
                              "last run, next run", "listMoves", "the moves, in config order",
                              "Moves")
    for action, state in (("pause", "paused"), ("resume", "running"),
                          ("drain", "draining")):
        paths[f"/v1/moves/{{move}}/{action}"] = _scheduled_change("move", action, state)
    return paths


_WHAT = {
    ("source", "pause"): "no run starts, and a run in hand stops after its batch",
    ("source", "resume"): "runs start again on the schedule",
    ("source", "drain"): "the run in hand goes on until it finds no more rows; then none "
                         "starts",
    ("move", "pause"): "no run starts, and a run in hand stops between two steps of a "
                       "partition (its flow move:NAME keeps committing the via stream)",
    ("move", "resume"): "runs start again on the schedule, each partition where it was",
    ("move", "drain"): "the run in hand finishes its partitions; then none starts",
}


def _scheduled_change(kind: str, action: str, state: str) -> dict[str, Any]:
    return {"post": {
        "summary": f"Ask every daemon running the {kind} to follow the state {state!r}: "
                   f"{_WHAT[kind, action]}",
        "operationId": f"{action}{kind.title()}", "security": [{"bearer": []}],
        "parameters": [{"name": kind, "in": "path", "required": True,
                        "description": f"the [[{kind}]]'s name in the config",
                        "schema": {"type": "string", "minLength": 1}}],
        "responses": {
            "200": _json_answer("the state asked for, by whom and when",
                                f"{kind.title()}Steered"),
            **_REFUSALS, "404": _problem(f"no such {kind}; nothing changed"),
            "409": _problem("a key holds something else than flowd wrote there"),
            "503": _problem(f"the {kind}'s Redis does not answer")}}}


_NULLABLE_INT = {"type": "integer", "nullable": True}
_NULLABLE_TEXT = {"type": "string", "nullable": True}
_FLOW_ITEM = {
    "type": "object", "required": ["flow", "stream", "group", "server"],
    "description": "an item of flowd status --json (with `error` instead of figures when "
                   "its Redis did not answer), and rate, desired, daemons",
    "properties": {
        "flow": {"type": "string"}, "stream": {"type": "string"},
        "group": {"type": "string"}, "server": {"type": "string"},
        "group_exists": {"type": "boolean"}, "length": {"type": "integer"},
        "lag": _NULLABLE_INT, "pending": {"type": "integer"},
        "oldest_pending_idle_ms": {"type": "integer"},
        "idle_scanned_all": {"type": "boolean"}, "consumers": {"type": "integer"},
        "dead_letter": _NULLABLE_TEXT, "dead_letter_length": _NULLABLE_INT,
        "state": {"type": "string", "enum": ["running", "paused", "draining"]},
        "error": {"type": "string"},
        "rate": {"type": "number", "nullable": True,
                 "description": "entries acked per second by the live daemons running it "
                                "(null: the registry did not answer)"},
        "desired": {"type": "object", "nullable": True, "properties": {
            "state": {"type": "string"}, "by": {"type": "string"},
            "at_ms": {"type": "integer"}}},
        "daemons": {"type": "array", "items": {"type": "object"}},
    },
}


_SOURCE_ITEM = {
    "type": "object", "required": ["source"],
    "description": "an item of flowd status --json's sources (with `error` instead of "
                   "figures when its Redis did not answer)",
    "properties": {
        "source": {"type": "string"},
        "state": {"type": "string", "enum": ["running", "paused", "draining"]},
        "cursor": {"type": "array", "nullable": True, "items": {"type": "string"},
                   "description": "the cursor columns' values in the last row written"},
        "lag_s": {"type": "number", "nullable": True,
                  "description": "seconds since a run last found no row after the cursor"},
        "rows": {"type": "integer"}, "written": {"type": "integer"},
        "last_run": {"type": "object", "properties": {
            "start_ms": _NULLABLE_INT, "end_ms": _NULLABLE_INT,
            "outcome": {"type": "string", "nullable": True,
                        "enum": ["running", "ok", "failed", "stopped", None]},
            "error": _NULLABLE_TEXT, "rows": {"type": "integer"}}},
        "next_ms": _NULLABLE_INT, "held": _NULLABLE_TEXT, "running_on": _NULLABLE_TEXT,
        "schedule": {"type": "string"}, "redis": {"type": "string"},
        "now_ms": {"type": "integer", "description": "the Redis time it was read at"},
        "error": {"type": "string"},
    },
}


_MOVE_ITEM = {
    "type": "object", "required": ["move"],
    "description": "an item of flowd status --json's moves (with `error` instead of figures "
                   "when [redis] did not answer)",
    "properties": {
        "move": {"type": "string"},
        "state": {"type": "string", "enum": ["running", "paused", "draining"]},
        "partitions_moved": {"type": "integer", "description": "moved, verified on both "
                             "servers and dropped from the hot one"},
        "rows_moved": {"type": "integer"},
        "partitions": {"type": "array", "description": "in hand: begun and not done",
                       "items": {"type": "object", "properties": {
                           "partition": {"type": "string"}, "phase": {"type": "string"},
                           "attempts": {"type": "integer"},
                           "sent": {"type": "integer",
                                    "description": "rows written into the via stream"},
                           "rows": {"type": "integer"}, "error": _NULLABLE_TEXT}}},
        "stuck": {"type": "array", "items": {"type": "string"},
                  "description": "partitions stopped for an operator (see their error)"},
        "last_run": {"type": "object", "properties": {
            "start_ms": _NULLABLE_INT, "end_ms": _NULLABLE_INT,
            "outcome": {"type": "string", "nullable": True,
                        "enum": ["running", "ok", "failed", "stopped", None]},
            "error": _NULLABLE_TEXT}},
        "next_ms": _NULLABLE_INT, "running_on": _NULLABLE_TEXT,
        "schedule": {"type": "string"}, "table": {"type": "string"},
        "to": {"type": "object", "properties": {"clickhouse": {"type": "string"},
                                                "server": {"type": "string"}}},
        "via": {"type": "string"}, "redis": {"type": "string"},
        "now_ms": {"type": "integer", "description": "the Redis time it was read at"},
        "error": {"type": "string"},
    },
}


def _steered(kind: str) -> dict[str, Any]:
    return {"type": "object", "required": [kind, "state", "at_ms"], "properties": {
        kind: {"type": "string"},
        "state": {"type": "string", "enum": ["running", "paused", "draining"]},
        "by": {"type": "string"}, "at_ms": {"type": "integer"}}}


def _source_schemas() -> dict[str, Any]:
    listed = {"read_at": {"type": "number"},
              "actions": {"type": "array", "items": {"type": "string"}}}
    return {
        "Sources": {"type": "object", "required": ["sources"], "properties": {
            "sources": {"type": "array", "items": _SOURCE_ITEM}, **listed}},
        "SourceSteered": _steered("source"),
        "Moves": {"type": "object", "required": ["moves"], "properties": {
            "moves": {"type": "array", "items": _MOVE_ITEM}, **listed}},
        "MoveSteered": _steered("move"),
    }


def console_schemas() -> dict[str, Any]:
    lines = {"type": "array", "items": {"type": "string"}}
    return {
        **_source_schemas(),
        "Flows": {"type": "object", "required": ["flows"], "properties": {
            "flows": {"type": "array", "items": _FLOW_ITEM}, "read_at": {"type": "number"},
            "registry_error": _NULLABLE_TEXT, "actions": lines}},
        "Daemons": {"type": "object", "required": ["daemons"], "properties": {
            "daemons": {"type": "array", "items": {"type": "object"}},
            "not_shown": {"type": "integer", "minimum": 0},
            "read_at": {"type": "number"}}},
        "Rates": {"type": "object", "required": ["flows"], "properties": {
            "every_s": {"type": "number"}, "history_s": {"type": "number"},
            "flows": {"type": "object", "additionalProperties": {
                "type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                           "items": {"type": ["number", "null"]}}}}}},
        "Graph": {"type": "object", "required": ["nodes", "edges", "groups"], "properties": {
            "live": {"type": "boolean"},
            "groups": {"type": "array", "items": {"type": "object", "properties": {
                "key": {"type": "string"}, "kind": {"type": "string"}, "lines": lines}}},
            "nodes": {"type": "array", "items": {"type": "object", "properties": {
                "key": {"type": "string"}, "kind": {"type": "string"}, "lines": lines,
                "group": {"type": "string"}}}},
            "edges": {"type": "array", "items": {"type": "object", "properties": {
                "source": {"type": "string"}, "target": {"type": "string"},
                "kind": {"type": "string"}, "lines": lines}}}}},
        "DeadLetters": {"type": "object", "required": ["flow", "letters"], "properties": {
            "flow": {"type": "string"}, "stream": {"type": "string"},
            "dead_letter": {"type": "string"}, "length": {"type": "integer"},
            "count": {"type": "integer"},
            "letters": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "source_id": _NULLABLE_TEXT,
                "flow": _NULLABLE_TEXT, "deliveries": _NULLABLE_INT,
                "reason": _NULLABLE_TEXT,
                "fields": {"type": "object", "additionalProperties": {"type": "string"}},
                "truncated": lines}}}}},
        "Ids": {"type": "object", "required": ["ids"], "properties": {"ids": {
            "type": "array", "minItems": 1, "maxItems": 1000,
            "items": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"}}}},
        "Replayed": {"type": "object", "required": ["replayed"], "properties": {
            "flow": {"type": "string"}, "replayed": {"type": "integer"},
            "kept": {**lines, "description": "named, but with no original fields to send "
                                             "back (purge them)"}}},
        "Purged": {"type": "object", "required": ["purged"], "properties": {
            "flow": {"type": "string"}, "purged": {"type": "integer"}, "kept": lines}},
        "Steered": {"type": "object", "required": ["flow", "state", "at_ms"], "properties": {
            "flow": {"type": "string"},
            "state": {"type": "string", "enum": ["running", "paused", "draining"]},
            "by": {"type": "string"}, "at_ms": {"type": "integer"}}},
    }


def document() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "flowd", "version": __version__,
                 "description": "The message hub over HTTP: flat records into Redis streams; "
                                "the web console and its API."},
        "paths": {
            "/v1/streams/{stream}": {"post": _post()},
            **console_paths(),
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
                **console_schemas(),
            },
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "a token of [http.tokens.NAME]: `streams` to post to them, "
                               "`read = true` to read dead letters, `control = true` to "
                               "change flows, sources, moves and dead letters (and read "
                               "them)"}},
        },
    }
