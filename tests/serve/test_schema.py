"""Schemathesis against the app's own OpenAPI schema: generated requests to every operation
(valid and invalid bodies) never get a 5xx, and every answer is JSON, text or an event stream."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.serve.conftest import KEY, Running


def test_no_generated_request_gets_a_server_error(server: Running) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/classify", "/v1/chat/completions", "/v1/embeddings", "/v1/qa"}
    calls = 0
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:  # type: ignore[no-untyped-def]
            nonlocal calls
            if isinstance(case.body, dict):
                if isinstance(case.body.get("max_tokens"), int):
                    case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # bounded work per request
                case.body.pop("stream", None)
            response = case.call(base_url=server.url, headers=headers, timeout=60)
            calls += 1
            case.validate_response(response, checks=(not_a_server_error,))
            kind = response.headers.get("content-type", "")
            kind = kind[0] if isinstance(kind, list) else kind  # schemathesis keeps header values as lists
            assert kind.startswith(("application/json", "text/plain", "text/html", "text/event-stream")), kind

        check()
    assert calls >= 5 * len(operations)
