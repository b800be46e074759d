"""A property-based fuzz run of the HTTP API generated from its own OpenAPI document
(schemathesis): no 5xx but the documented 503, every answer as documented, and a request
that is not answered 200 writes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import schemathesis
import servers
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_ingest import Served, config_text

from flowd.http.openapi import document

schema = schemathesis.openapi.from_dict(document()).include(path_regex="^/v1/")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           redis_server: servers.Server) -> Iterator[Served]:
    port = servers.free_port()
    config = Path(tmp_path_factory.mktemp("fuzz")) / "serve.toml"
    # any_stream: the fuzzer's stream names are accepted, so the write path is exercised.
    config.write_text(config_text(redis_server.url, port, "any_stream = true\n"))
    process = Served(config, port)
    yield process
    assert process.stop() == 0


@schema.parametrize()
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_the_api_answers_as_its_document_says_and_refusals_write_nothing(
        case: schemathesis.Case, served: Served, redis_server: servers.Server) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        before = client.dbsize()
        response = case.call_and_validate(
            base_url=f"http://127.0.0.1:{served.port}",
            checks=[status_code_conformance, content_type_conformance,
                    response_schema_conformance])
        assert response.status_code < 500 or response.status_code == 503, response.text
        if response.status_code != 200:
            assert client.dbsize() == before  # nothing written
    finally:
        client.close()
