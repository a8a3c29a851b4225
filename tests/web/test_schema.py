"""Property-based checks of the API against its own OpenAPI schema (schemathesis): no request the
schema allows may get a 5xx answer or a response that breaks the schema."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, settings  # noqa: E402

from cnnscope.web import create_app  # noqa: E402

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app())


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_follows_its_schema(case):
    response = case.call()
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "error" in response.json()
