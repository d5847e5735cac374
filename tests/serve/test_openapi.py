"""Schemathesis against /openapi.json: generated requests, valid and invalid, to every operation; no answer is
5xx, every answer (status, media type, body, headers) is one the document describes, every request the document
allows is taken (2xx, or 429 for a full queue) and every one it forbids is refused. In process, and as a user
runs it: the `st` command against a live server."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from app.model.config import DEMO
from app.model.sampling import SamplingParams
from app.serve.app import create_app
from app.serve.http.limits import Limits
from app.serve.http.openapi import with_limits
from app.serve.settings import ServeSettings
from tests.serve.conftest import live_server_process, serve_settings, serving

DEMO_MODEL = Path(__file__).parents[2] / "model_store" / "demo"
SMALL = {"max_images_per_request": 2, "queue_capacity": 4, "max_batch_size": 2, "default_timeout_s": 5}


def small_settings(folder: Path) -> ServeSettings:
    return serve_settings(folder, max_timeout_s=5, **SMALL)


def demo_limits(s: ServeSettings) -> Limits:
    """The limits a service of these settings has once a demo-shaped model is loaded."""
    var = DEMO.var
    return Limits(
        var.num_classes, DEMO.class_names, var.vocab_size, tuple(s.variants), s.variants[0], SamplingParams(),
        s.max_images_per_request, s.default_timeout_s, s.max_timeout_s,
    )  # fmt: skip


# The document is made before the model is loaded (Schemathesis's fixture-based loader does not work with
# pytest 9), from an app that is never started and the limits the loaded model will have; the test below checks
# that the served one is the same.
NOT_LOADED = small_settings(Path("not-loaded"))
UNLOADED = create_app(NOT_LOADED).openapi()
DOCUMENT = with_limits(UNLOADED, demo_limits(NOT_LOADED))
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))  # a copy: Schemathesis may rewrite it


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
    case.validate_response(response)  # every check, not_a_server_error and positive_data_acceptance included


def test_the_document_describes_raw_images_and_every_error_body(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc == DOCUMENT and doc != UNLOADED
    generate = doc["paths"]["/generate"]["post"]["responses"]
    assert {"image/png", "image/jpeg", "image/webp", "application/json"} <= set(generate["200"]["content"])
    assert {"406", "408", "413", "422", "429", "500", "503", "504"} <= set(generate)
    for status in ("429", "503"):
        assert generate[status]["headers"]["Retry-After"]["required"]
    assert "error_id" in str(generate["500"]["content"]) or "FailureBody" in str(generate["500"]["content"])
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "Retry-After" in doc["paths"]["/readyz"]["get"]["responses"]["503"]["headers"]


def test_the_loaded_models_limits_are_in_the_document_and_exactly_one_class_field_is_required() -> None:
    request = DOCUMENT["components"]["schemas"]["GenerateRequest"]
    fields = request["properties"]
    assert fields["class_label"]["anyOf"][0]["maximum"] == DEMO.var.num_classes - 1
    assert fields["class_name"]["anyOf"][0]["enum"] == list(DEMO.class_names)
    assert fields["num_images"]["maximum"] == 2 and fields["top_k"]["anyOf"][0]["maximum"] == DEMO.var.vocab_size
    assert fields["variant"]["anyOf"][0]["enum"] == ["baseline"] and fields["timeout_s"]["anyOf"][0]["maximum"] == 5
    one_of, seed_for_two = request["allOf"]
    assert [b["required"] for b in one_of["oneOf"]] == [["class_label"], ["class_name"]]
    assert seed_for_two["then"]["properties"]["seed"]["maximum"] == 2**53 - 2
    unloaded = UNLOADED["components"]["schemas"]["GenerateRequest"]["properties"]
    assert "maximum" not in unloaded["class_label"]["anyOf"][0] and "enum" not in unloaded["variant"]["anyOf"][0]


@pytest.mark.slow
def test_the_schemathesis_command_finds_no_failure_against_a_live_server(tmp_path: Path) -> None:
    """`st run <url>/openapi.json --checks all`, its coverage and fuzzing phases, against `python -m app.serve`
    serving the demo model. One worker: concurrent requests would queue behind each other, and a request whose
    timeout_s (1 s at least) passes while it waits is rightly 504, which Schemathesis counts as a failure."""
    st = Path(sys.executable).with_name("st")
    env = {f"VAR_{k.upper()}": str(v) for k, v in SMALL.items()}
    env |= {"VAR_VARIANTS": "baseline", "VAR_MAX_TIMEOUT_S": "10"}
    options = ["--checks", "all", "--phases", "coverage,fuzzing", "--max-examples", "60", "--workers", "1"]
    quiet = ["--generation-database", "none", "--no-color"]  # no example database left behind
    with live_server_process(DEMO_MODEL, tmp_path / "server.log", **env) as server:
        command = [str(st), "run", f"{server.url}/openapi.json", *options, *quiet]
        run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    report = run.stdout[-6000:] + run.stderr[-2000:]  # the failures, each with its curl command, and the seed
    assert run.returncode == 0 and "No issues found" in run.stdout, report
    assert "✅ Coverage" in run.stdout and "✅ Fuzzing" in run.stdout, report  # both phases ran
