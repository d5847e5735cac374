"""The HTTP API through a TestClient of the real app on a random-weight demo-shaped model."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from app.model.config import DEMO
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.model.timing import Stage
from app.serve.app import create_app
from app.serve.http.encoding import encode_images
from app.serve.http.schemas import SEED_MAX, GenerateRequest, Timings
from tests.serve.conftest import gated_load, serve_settings, serving, wait_ready


@pytest.fixture(scope="module")
def client(demo_folder: Path) -> Iterator[TestClient]:
    with serving(serve_settings(demo_folder, variants=["baseline", "bf16"], max_images_per_request=8)) as c:
        yield c


def png(data_b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_b64)))


def test_generate_returns_images_with_their_seeds_variant_and_timings(client: TestClient) -> None:
    r = client.post("/generate", json={"class_label": 3, "num_images": 2, "seed": 40, "top_k": 0, "top_p": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["variant"] == "baseline" and body["class_label"] == 3 and body["class_name"] == "Dress"
    assert [im["seed"] for im in body["images"]] == [40, 41]
    assert all(png(im["data"]).size == (32, 32) for im in body["images"])
    assert body["images"][0]["data"] != body["images"][1]["data"]
    stages = {"queued", "transformer", "sampling", "latent", "decode", "encode", "total"}
    assert set(body["timings"]) == {f"{s}_ms" for s in stages}
    assert {f"{s}_ms" for s in Stage} | {"queued_ms", "total_ms"} == set(Timings.model_fields)  # one field a stage
    assert body["timings"]["transformer_ms"] > 0 and body["batch_sizes"] == [2]
    assert "transformer;dur=" in r.headers["server-timing"]


def test_same_seed_same_image_and_random_seeds_are_returned(client: TestClient) -> None:
    a, b = (client.post("/generate", json={"class_name": "Bag", "seed": 5}).json() for _ in range(2))
    assert a["images"][0]["data"] == b["images"][0]["data"]
    drawn = client.post("/generate", json={"class_label": 8, "num_images": 2}).json()["images"]
    assert 0 <= drawn[0]["seed"] <= SEED_MAX and drawn[1]["seed"] == drawn[0]["seed"] + 1


def test_accept_image_png_answers_the_raw_image_with_headers(client: TestClient) -> None:
    r = client.post("/generate", json={"class_label": 2, "seed": 9}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    assert r.headers["x-seed"] == "9" and r.headers["x-variant"] == "baseline" and r.headers["x-class-label"] == "2"
    stages = {part.split(";")[0] for part in r.headers["server-timing"].split(", ")}
    assert stages == {"queue", "transformer", "sampling", "latent", "decode", "encode", "total"}
    as_json = client.post("/generate", json={"class_label": 2, "seed": 9}).json()
    assert base64.b64decode(as_json["images"][0]["data"]) == r.content


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_both_as_json_and_raw(client: TestClient, fmt: str) -> None:
    body = client.post("/generate", json={"class_label": 1, "seed": 1, "format": fmt}).json()
    assert body["media_type"] == f"image/{fmt}" and png(body["images"][0]["data"]).format == fmt.upper()
    raw = client.post("/generate", json={"class_label": 1, "seed": 1}, headers={"Accept": f"image/{fmt}"})
    assert raw.headers["content-type"] == f"image/{fmt}"
    assert Image.open(io.BytesIO(raw.content)).format == fmt.upper()


def test_raw_image_answer_refuses_several_images_or_another_format(client: TestClient) -> None:
    several = client.post("/generate", json={"class_label": 1, "num_images": 2}, headers={"Accept": "image/png"})
    assert several.status_code == 406 and "one image" in several.json()["detail"]
    clash = client.post("/generate", json={"class_label": 1, "format": "jpeg"}, headers={"Accept": "image/png"})
    assert clash.status_code == 406 and "jpeg" in clash.json()["detail"]


@pytest.mark.parametrize("accept", ["image/gif", "text/html", "application/xml, image/bmp", "*/*;q=0", "image/png;q=0"])
def test_an_accept_the_service_cannot_satisfy_is_406_naming_what_it_gives(client: TestClient, accept: str) -> None:
    r = client.post("/generate", json={"class_label": 1}, headers={"Accept": accept})
    assert r.status_code == 406, r.text
    detail = r.json()["detail"]
    assert all(t in detail for t in ("application/json", "image/png", "image/jpeg", "image/webp")), detail


@pytest.mark.parametrize("accept", [None, "", "*/*", "application/json", "application/*", "image/gif, */*;q=0.1"])
def test_wildcards_json_and_no_accept_answer_json(client: TestClient, accept: str | None) -> None:
    headers = {} if accept is None else {"Accept": accept}
    r = client.post("/generate", json={"class_label": 1, "seed": 2}, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", (accept, r.text)


def test_accept_image_any_answers_the_body_format(client: TestClient) -> None:
    png = client.post("/generate", json={"class_label": 1, "seed": 2}, headers={"Accept": "image/*"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    webp = client.post("/generate", json={"class_label": 1, "seed": 2, "format": "webp"}, headers={"Accept": "image/*"})
    assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"


def test_variants_side_by_side_same_seed(client: TestClient) -> None:
    a = client.post("/generate", json={"class_label": 4, "seed": 3, "variant": "baseline"}).json()
    b = client.post("/generate", json={"class_label": 4, "seed": 3, "variant": "bf16"}).json()
    assert (a["variant"], b["variant"]) == ("baseline", "bf16")
    assert a["images"][0]["seed"] == b["images"][0]["seed"] == 3


@pytest.mark.parametrize(
    ("field", "value", "limit"),
    [
        ("num_images", 9, "at most 8 (max_images_per_request)"),
        ("num_images", 0, "greater than or equal to 1"),
        ("class_label", 10, "less than 10"),
        ("class_label", -1, "greater than or equal to 0"),
        ("top_k", 513, "at most 512"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("cfg", -0.5, "greater than or equal to 0"),
        ("timeout_s", 601, "at most 600"),
        ("timeout_s", 0, "greater than or equal to 1"),
        ("timeout_s", 0.999, "greater than or equal to 1"),
        ("class_label", 1.5, "valid integer"),
        ("seed", SEED_MAX + 1, f"less than or equal to {SEED_MAX}"),
        ("seed", -1, "greater than or equal to 0"),
        ("format", "gif", "'png', 'jpeg' or 'webp'"),
        ("num_images", "2", "valid integer"),
        ("unexpected", 1, "Extra inputs are not permitted"),
    ],
)
def test_out_of_range_input_is_422_naming_the_field_and_the_limit(
    client: TestClient, field: str, value: Any, limit: str
) -> None:
    body = {"class_label": 1} | {field: value}
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    errors = [e for e in r.json()["detail"] if e["loc"] == ["body", field]]
    assert errors and limit in errors[0]["msg"], r.json()


def numeric_fields() -> list[str]:
    """Every field of the request schema that takes a number (JSON schema type integer or number)."""
    properties = GenerateRequest.model_json_schema()["properties"]
    types = {name: {p.get("type") for p in [prop, *prop.get("anyOf", [])]} for name, prop in properties.items()}
    return [name for name, t in types.items() if t & {"integer", "number"}]


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"the answer holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_request_schema_has_the_numeric_fields_tested_below() -> None:
    assert set(numeric_fields()) == {"class_label", "num_images", "seed", "cfg", "top_k", "top_p", "timeout_s"}


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("field", numeric_fields())
def test_a_non_finite_number_in_any_numeric_field_is_422_naming_it_never_echoed(
    client: TestClient, field: str, number: str
) -> None:
    """JSON has no NaN or Infinity, but Python's parser takes them, and 1e400 parses as infinity: each must be a
    422 that names the field, and the answer must stay JSON (no NaN echoed back)."""
    others = "" if field == "class_label" else '"class_label": 1, '
    body = f'{{{others}"{field}": {number}}}'
    r = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, (body, r.text)
    errors = [e for e in strict_json(r.text)["detail"] if e["loc"] == ["body", field]]
    assert errors, r.text
    assert all("input" not in e for e in errors), r.text


@pytest.mark.parametrize("field", ["class_name", "variant", "format", "more_smooth", "unknown_field"])
def test_a_non_finite_number_in_any_other_field_is_422_too(client: TestClient, field: str) -> None:
    body = f'{{"class_label": 1, "{field}": NaN}}'
    r = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and [e for e in strict_json(r.text)["detail"] if e["loc"] == ["body", field]]


def test_a_whole_number_written_with_a_fraction_is_the_integer_it_is(client: TestClient) -> None:
    """JSON Schema counts 3.0 as an integer, as the published document's generators do."""
    r = client.post("/generate", json={"class_label": 3.0, "num_images": 2.0, "seed": 5.0, "top_k": 0.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["class_label"] == 3 and [i["seed"] for i in body["images"]] == [5, 6]


def test_seed_range_accounts_for_every_image(client: TestClient) -> None:
    r = client.post("/generate", json={"class_label": 1, "seed": SEED_MAX, "num_images": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "seed"]


def test_unknown_variant_and_class_name_list_the_valid_ones(client: TestClient) -> None:
    r = client.post("/generate", json={"class_name": "Dog", "variant": "int4"})
    assert r.status_code == 422
    by_field = {e["loc"][1]: e["msg"] for e in r.json()["detail"]}
    assert "baseline, bf16" in by_field["variant"]
    assert "'T-shirt/top'" in by_field["class_name"] and "'Ankle boot'" in by_field["class_name"]
    neither = client.post("/generate", json={"seed": 1})
    assert neither.status_code == 422 and "exactly one of class_label and class_name" in neither.text
    empty = client.post("/generate", json={"class_label": 0, "variant": ""})  # not the default: no variant's name
    assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body", "variant"]


def test_class_names_match_case_insensitively(client: TestClient) -> None:
    r = client.post("/generate", json={"class_name": " ankle  BOOT", "seed": 1})
    assert r.status_code == 200 and (r.json()["class_label"], r.json()["class_name"]) == (9, "Ankle boot")


def test_oversize_body_is_413_with_or_without_content_length(client: TestClient) -> None:
    big = b'{"class_label": 1, "variant": "' + b"x" * 20_000 + b'"}'
    r = client.post("/generate", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    chunked = client.post("/generate", content=iter([big[:10_000], big[10_000:]]))
    assert chunked.status_code == 413


def test_models_lists_variants_passes_memory_classes_and_limits(client: TestClient) -> None:
    m = client.get("/models").json()
    assert m["model"]["preset"] == "demo" and m["model"]["image_size"] == 32
    assert [v["name"] for v in m["variants"]] == ["baseline", "bf16"] and m["default_variant"] == "baseline"
    bf16 = m["variants"][1]
    assert bf16["passes"][0]["name"] == "autocast_bf16" and bf16["passes"][0]["options"] == {}
    assert all(v["weight_bytes"] > 0 and v["shares_vqvae"] for v in m["variants"])
    assert m["shared_weight_bytes"] > 0
    assert m["classes"][0] == {"label": 0, "name": "T-shirt/top", "synonyms": []} and len(m["classes"]) == 10
    assert m["limits"]["max_images_per_request"] == 8 and m["limits"]["top_k_max"] == 512
    assert m["defaults"] == dataclasses.asdict(DEMO.default_sampling)


def test_models_and_model_info_name_the_model_without_its_path(client: TestClient, demo_folder: Path) -> None:
    m = client.get("/models")
    assert m.json()["model"]["name"] == demo_folder.name
    metrics = client.get("/metrics").text
    assert f'model="{demo_folder.name}"' in metrics
    for text in (m.text, metrics):
        assert str(demo_folder) not in text and str(demo_folder.parent) not in text


def test_health_readiness_playground_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = {"state": "ready", "doing": None, "progress": None, "error": None}
    assert client.get("/readyz").json() == {"status": "ready", "variants": {"baseline": ready, "bf16": ready}}
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert "/generate" in client.get("/openapi.json").json()["paths"]


def test_an_image_is_bitwise_the_same_batched_or_alone(demo_folder: Path, demo_pipeline: VARPipeline) -> None:
    """Three requests with different classes, seeds and sampling are computed in one batch (max_batch_size 3,
    a wait long enough that only a full batch starts); each image equals its request computed alone."""
    bodies = [
        {"class_label": 1, "seed": 100, "cfg": 1.5, "top_k": 0, "top_p": 0.0},
        {"class_label": 5, "seed": 200, "cfg": 4.0, "top_k": 20, "top_p": 0.9},
        {"class_label": 9, "seed": 300, "cfg": 0.0, "top_k": 0, "top_p": 0.5, "more_smooth": True},
    ]
    with serving(serve_settings(demo_folder, max_batch_size=3, max_wait_ms=60_000)) as c, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: c.post("/generate", json=b).json(), bodies))
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["batch_sizes"] == [3]
        params = SamplingParams(body["cfg"], body["top_k"], body["top_p"], body.get("more_smooth", False))
        alone = demo_pipeline.generate([body["class_label"]], params, seeds=[body["seed"]])
        assert base64.b64decode(answer["images"][0]["data"]) == encode_images(alone.images, "png")[0]


def warmed_up_app(folder: Path) -> FastAPI:
    return create_app(serve_settings(folder, warmup=True, max_batch_size=2))


def test_503_with_retry_after_until_loaded_and_warmed_up(demo_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loading = gated_load(monkeypatch)
    with TestClient(warmed_up_app(demo_folder)) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "loading" and "retry-after" in ready.headers
        early = c.post("/generate", json={"class_label": 1})
        assert early.status_code == 503 and early.headers["retry-after"] == "5"
        detail = "not accepting requests: loading (default variant baseline is waiting for the checkpoint to be read)"
        assert early.json()["detail"] == detail
        assert 'var_rejections_total{reason="not_ready"} 1.0' in c.get("/metrics").text
        assert c.get("/models").status_code == 503
        loading.set()
        wait_ready(c)
        assert c.post("/generate", json={"class_label": 1}).status_code == 200


def test_a_model_that_fails_to_load_is_not_alive(tmp_path: Path) -> None:
    with TestClient(warmed_up_app(tmp_path / "missing")) as c:
        while c.get("/readyz").json()["status"] == "loading":
            time.sleep(0.01)
        health = c.get("/healthz")
        assert health.status_code == 503 and "missing" in health.json()["error"]
        refused = c.post("/generate", json={"class_label": 1})
        assert refused.status_code == 503 and refused.json()["detail"] == "not accepting requests: model failed to load"
        assert 'var_rejections_total{reason="not_ready"} 1.0' in c.get("/metrics").text
