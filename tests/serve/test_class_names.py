"""ImageNet class names through the API: the official tiny checkpoint (1000 classes) gets them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import TINY
from tests.serve.conftest import serve_settings, serving


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with serving(serve_settings(TINY)) as c:
        yield c


def class_name_error(client: TestClient, name: str) -> str:
    r = client.post("/generate", json={"class_name": name})
    assert r.status_code == 422
    errors: list[dict[str, Any]] = r.json()["detail"]
    assert [e["loc"] for e in errors] == [["body", "class_name"]]
    return str(errors[0]["msg"])


def test_models_lists_imagenet_names_with_their_synonyms(client: TestClient) -> None:
    classes = client.get("/models").json()["classes"]
    assert len(classes) == 1000
    assert classes[1] == {"label": 1, "name": "goldfish", "synonyms": ["Carassius auratus"]}
    assert classes[207] == {"label": 207, "name": "golden retriever", "synonyms": []}


@pytest.mark.parametrize(
    "given, label, name", [("Carassius Auratus", 1, "goldfish"), ("GOLDEN retriever", 207, "golden retriever")]
)
def test_a_synonym_in_any_case_generates_its_class(client: TestClient, given: str, label: int, name: str) -> None:
    r = client.post("/generate", json={"class_name": given, "seed": 0})
    assert r.status_code == 200
    assert (r.json()["class_label"], r.json()["class_name"]) == (label, name)


def test_a_name_of_two_classes_is_422_listing_both(client: TestClient) -> None:
    msg = class_name_error(client, "Crane")
    assert msg == "ambiguous class name, 2 classes have it: 134 'crane'; 517 'crane'; give class_label"
    msg = class_name_error(client, "panda")
    assert "387 'lesser panda' (also 'red panda', 'panda'" in msg and "388 'giant panda'" in msg


def test_an_unknown_name_suggests_the_closest_and_lists_no_thousand_names(client: TestClient) -> None:
    msg = class_name_error(client, "golden retreiver")
    assert msg.startswith("unknown class name; closest: 'golden retriever'")
    assert msg.endswith("all 1000 names and their synonyms: GET /models") and len(msg) < 300
