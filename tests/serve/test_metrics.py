"""GET /metrics, parsed as Prometheus text: every documented metric is there and moves as it should."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.bench.prometheus_text import Samples, parse, value
from app.serve.metrics import LATENCY_BUCKETS
from tests.serve.conftest import serve_settings, serving


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def client(demo_folder: Path) -> Iterator[TestClient]:
    with serving(serve_settings(demo_folder, variants=["baseline", "bf16"], max_batch_size=4)) as c:
        yield c


def test_requests_images_batches_and_stages_are_counted(client: TestClient) -> None:
    before = scrape(client)
    assert client.post("/generate", json={"class_label": 1, "num_images": 3, "top_k": 0}).status_code == 200
    after = scrape(client)

    assert delta(before, after, "var_requests_total", variant="baseline", status="200") == 1
    assert delta(before, after, "var_images_generated_total", variant="baseline") == 3
    assert delta(before, after, "var_batch_size_images_count", variant="baseline") == 1
    assert delta(before, after, "var_batch_size_images_sum", variant="baseline") == 3
    assert delta(before, after, "var_request_images_sum", variant="baseline") == 3
    assert delta(before, after, "var_queue_wait_seconds_count", variant="baseline") == 1
    assert delta(before, after, "var_request_duration_seconds_count", variant="baseline") == 1
    for stage in ("transformer", "sampling", "latent", "decode", "encode"):
        assert delta(before, after, "var_stage_duration_seconds_count", variant="baseline", stage=stage) == 1, stage
    assert value(after, "var_queue_depth_images", variant="baseline") == 0
    assert value(after, "var_inflight_images", variant="bf16") == 0


def test_rejections_are_counted_by_reason_and_clients_cannot_create_labels(client: TestClient) -> None:
    before = scrape(client)
    assert client.post("/generate", json={"class_label": 1, "variant": "made-up"}).status_code == 422
    assert client.post("/generate", content=b"x" * 20_000).status_code == 413
    after = scrape(client)
    for reason in ("invalid", "body_too_large"):
        assert delta(before, after, "var_rejections_total", reason=reason) == 1, reason
    assert value(after, "var_requests_total", variant="unknown", status="422") >= 1
    assert value(after, "var_requests_total", variant="unknown", status="413") >= 1
    assert not any(dict(labels).get("variant") == "made-up" for _, labels in after)


def test_latency_is_observed_only_for_answers_with_images(client: TestClient) -> None:
    before = scrape(client)
    many_as_one_png = {"class_label": 1, "num_images": 2, "variant": "bf16"}
    assert client.post("/generate", json=many_as_one_png, headers={"Accept": "image/png"}).status_code == 406
    assert client.post("/generate", json={"class_label": 1, "num_images": 0}).status_code == 422
    after = scrape(client)
    assert delta(before, after, "var_requests_total", variant="bf16", status="406") == 1
    assert delta(before, after, "var_requests_total", variant="unknown", status="422") == 1
    for variant in ("bf16", "unknown"):
        assert delta(before, after, "var_request_duration_seconds_count", variant=variant) == 0, variant


def test_every_variant_series_is_exported_at_zero_from_the_start(demo_folder: Path) -> None:
    with serving(serve_settings(demo_folder, variants=["baseline", "bf16"])) as fresh:
        samples = scrape(fresh)
    for variant in ("baseline", "bf16"):
        for name in (
            "var_request_duration_seconds_count",
            "var_queue_wait_seconds_count",
            "var_batch_size_images_count",
        ):
            assert (name, frozenset({("variant", variant)})) in samples, (name, variant)
        assert ("var_requests_total", frozenset({("variant", variant), ("status", "200")})) in samples
        for stage in ("transformer", "sampling", "latent", "decode", "encode"):
            key = ("var_stage_duration_seconds_count", frozenset({("variant", variant), ("stage", stage)}))
            assert samples.get(key) == 0, key


def test_latency_buckets_are_fine_where_latencies_lie() -> None:
    edges = LATENCY_BUCKETS
    assert list(edges) == sorted(edges) and 30 <= len(edges) <= 40
    assert edges[0] == 0.005 and edges[-1] == 300
    fine = [e for e in edges if e <= 2.5]
    assert max(b / a for a, b in itertools.pairwise(fine)) <= 1.28, "10 buckets per decade up to 2.5 s"


def test_memory_per_variant(client: TestClient) -> None:
    for variant in ("baseline", "bf16"):  # a full batch of each: the KV cache's high-water mark
        body = {"class_label": 2, "num_images": 4, "variant": variant, "top_k": 0}
        assert client.post("/generate", json=body).status_code == 200
    samples = scrape(client)
    shared = value(samples, "var_shared_weight_bytes")
    for variant in ("baseline", "bf16"):  # both use the shared VQVAE
        own = value(samples, "var_model_weight_bytes", variant=variant)
        assert value(samples, "var_model_resident_bytes", variant=variant) == own + shared
        assert value(samples, "var_batch_peak_memory_bytes", variant=variant) > 0
    kv_float32 = value(samples, "var_kv_cache_bytes", variant="baseline")
    assert kv_float32 > 0
    assert value(samples, "var_kv_cache_bytes", variant="bf16") == kv_float32 / 2, "a bfloat16 cache"


def test_memory_model_info_and_readiness_are_exported(client: TestClient) -> None:
    samples = scrape(client)
    assert value(samples, "var_model_weight_bytes", variant="baseline") > 0
    assert value(samples, "var_model_weight_bytes", variant="bf16") > 0
    assert value(samples, "var_shared_weight_bytes") > 0  # both variants share the unchanged VQVAE
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "var_ready") == 1
    info = next(dict(labels) for (name, labels) in samples if name == "var_model_info")
    assert info["preset"] == "demo" and info["device"] == "cpu" and info["torch_version"]
    passes = {
        dict(labels)["variant"]: dict(labels)["passes"] for (name, labels) in samples if name == "var_variant_info"
    }
    assert passes == {"baseline": "device_default_precision", "bf16": "autocast_bf16"}
    for reason in ("queue_full", "deadline", "draining", "not_ready", "client_disconnected", "failed"):
        assert ("var_rejections_total", frozenset({("reason", reason)})) in samples
