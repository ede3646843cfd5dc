"""Schemathesis, from the API's own `/openapi.json`, against the live application with a valid key:
no 5xx, every answer as the schema documents it (status, body), errors in the documented envelope."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from workers.settings import get_settings

API_KEY = "fuzz-key"
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)

# CI runs the same examples every time (its verdict must not change by chance); a local run explores
# new ones, and keeps what fails in .hypothesis/.
IN_CI = bool(os.environ.get("CI"))


@pytest.fixture
def api_schema(monkeypatch: pytest.MonkeyPatch, clean_database: None) -> Iterator[Any]:
    monkeypatch.setenv("RENOVA_API_KEYS", API_KEY)
    get_settings.cache_clear()
    from workers.api import create_app

    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", create_app())
    finally:
        get_settings.cache_clear()


def test_no_server_error_and_answers_as_documented(api_schema: Any) -> None:
    # The webhook is signed: a random body is refused before anything else (its own tests sign theirs).
    operations = [
        operation
        for operation in (result.ok() for result in api_schema.get_all_operations())
        if operation.path != "/v1/webhooks/gateway"
    ]
    assert len(operations) >= 8, [operation.label for operation in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40, deadline=None, derandomize=IN_CI, suppress_health_check=list(HealthCheck), database=None
        )
        def answers_as_documented(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Bearer {API_KEY}"})
            # Every answer as documented; a schema-valid body may still break a business rule (a
            # CPF's check digits, say), so a 4xx for valid-looking data is not a failure here.
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str), response.text

        answers_as_documented()
