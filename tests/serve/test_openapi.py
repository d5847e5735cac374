"""Schemathesis against /openapi.json, in process: generated requests, valid and invalid, to every operation;
no answer is 5xx and every answer (status, media type, body, headers) is one the document describes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.serve.app import create_app
from app.serve.settings import ServeSettings
from tests.serve.conftest import serve_settings, serving

# Requests the schema allows can still be refused by limits that depend on the loaded model (the class range,
# the vocabulary, max_images_per_request): those are 422, which the document describes, so a valid-looking case
# answered 422 is no failure.
EXCLUDED = [positive_data_acceptance, not_a_server_error]


def small_settings(folder: Path) -> ServeSettings:
    small = {"max_images_per_request": 2, "queue_capacity": 4, "max_batch_size": 2, "default_timeout_s": 5}
    return serve_settings(folder, max_timeout_s=5, **small)


# The document does not depend on the model, so it is read from an app that is never started (Schemathesis's
# fixture-based loader does not work with pytest 9); the test below checks that the served one is the same.
DOCUMENT = create_app(small_settings(Path("not-loaded"))).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def client(demo_folder: Path) -> Iterator[TestClient]:
    with serving(small_settings(demo_folder)) as c:
        yield c


def httpx_arguments(case: Any, base_url: str) -> dict[str, Any]:
    """The case as the TestClient's arguments: Schemathesis writes them for `requests` (raw bytes as `data`,
    cookies per request), which httpx deprecates."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    kwargs["headers"] = dict(kwargs["headers"])
    cookies = kwargs.pop("cookies", None)
    if cookies:
        kwargs["headers"]["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    if isinstance(kwargs.get("data"), bytes | str):
        kwargs["content"] = kwargs.pop("data")
    return kwargs


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_every_answer_is_described_by_the_openapi_document_and_none_is_5xx(case: Any, client: TestClient) -> None:
    response = client.request(**httpx_arguments(case, str(client.base_url)))
    # 504 is the answer a request gets that set its own deadline (timeout_s) shorter than its computation
    own_deadline = isinstance(case.body, dict) and isinstance(case.body.get("timeout_s"), float)
    assert response.status_code < 500 or (response.status_code == 504 and own_deadline), (case.body, response.text)
    case.validate_response(response, excluded_checks=EXCLUDED)


def test_the_document_describes_raw_images_and_every_error_body(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc == DOCUMENT
    generate = doc["paths"]["/generate"]["post"]["responses"]
    assert {"image/png", "image/jpeg", "image/webp", "application/json"} <= set(generate["200"]["content"])
    assert {"406", "408", "413", "422", "429", "500", "503", "504"} <= set(generate)
    for status in ("429", "503"):
        assert generate[status]["headers"]["Retry-After"]["required"]
    assert "error_id" in str(generate["500"]["content"]) or "FailureBody" in str(generate["500"]["content"])
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "Retry-After" in doc["paths"]["/readyz"]["get"]["responses"]["503"]["headers"]
