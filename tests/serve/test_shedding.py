"""While the queue has no free row, POST /generate is answered 429 before its body is validated or routed
(`middleware.ShedWhenFull`): what is refused there, what is not, and how it is counted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.bench import prometheus_text
from tests.serve.conftest import serve_settings, serving

INVALID = {"class_label": 10**6}  # the route would answer 422: over the demo model's classes


@pytest.fixture
def client(demo_folder: Path) -> Iterator[TestClient]:
    with serving(serve_settings(demo_folder, api_keys=["key-number-one-0001"])) as c:
        yield c


def hold_full(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    monkeypatch.setattr(engine, "queued_images", lambda: engine.queue_capacity)


def counted(client: TestClient, name: str, labels: dict[str, str]) -> float:
    samples = prometheus_text.parse(client.get("/metrics").text)
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


KEY = {"X-API-Key": "key-number-one-0001"}


def test_a_full_queue_refuses_before_validation_and_counts_the_refusal(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.post("/generate", json=INVALID, headers=KEY).status_code == 422  # rows free: validated
    hold_full(client, monkeypatch)
    before = counted(client, "var_rejections_total", {"reason": "queue_full"})
    refused = client.post("/generate", json=INVALID, headers=KEY)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert "queue" in refused.json()["detail"]
    assert counted(client, "var_rejections_total", {"reason": "queue_full"}) == before + 1
    assert counted(client, "var_requests_total", {"variant": "baseline", "status": "429"}) >= 1
    monkeypatch.undo()
    assert client.post("/generate", json={"class_label": 1, "seed": 3}, headers=KEY).status_code == 200


@pytest.mark.parametrize("body", [b"[1, 2]", b"{", b"null", b""], ids=["array", "truncated", "null", "empty"])
def test_a_body_that_is_not_a_json_object_gets_its_own_422_while_full(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    hold_full(client, monkeypatch)
    answer = client.post("/generate", content=body, headers=KEY | {"Content-Type": "application/json"})
    assert answer.status_code == 422


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-API-Key": "key-number-two-0002"}, 401),
        ({"Authorization": "Basic key-number-one-0001"}, 401),
        ({"Authorization": "Bearer key-number-one-0001"}, 429),
        ({"authorization": "bearer key-number-one-0001"}, 429),
        (KEY, 429),
    ],
)
def test_only_a_request_with_a_valid_key_learns_that_the_queue_is_full(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, headers: dict[str, str], status: int
) -> None:
    hold_full(client, monkeypatch)
    assert client.post("/generate", json={"class_label": 1}, headers=headers).status_code == status


def test_other_routes_are_not_refused_while_full(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    hold_full(client, monkeypatch)
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/generate").status_code == 405
