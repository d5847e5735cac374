"""The deployment's options follow the service's settings; the builder checks its arguments (no Ray cluster)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application

from app.ray_serve import DEPLOYMENT_NAME, RayServeArgs, build_app, deployment_options
from app.ray_serve.deployment import SHUTDOWN_MARGIN_S
from app.serve.settings import ServeSettings
from tests.conftest import ROOT
from tests.test_docs import table_with_header, unquote


def options(gpus_in_cluster: bool = False, **settings: Any) -> dict[str, Any]:
    return deployment_options(ServeSettings(**settings), RayServeArgs(), gpus_in_cluster)


@pytest.mark.parametrize(
    ("device", "gpus_in_cluster", "gpus"),
    [("cpu", True, 0), ("cuda", False, 1), ("cuda:1", False, 1), ("auto", True, 1), ("auto", False, 0)],
)
def test_a_replica_asks_for_one_gpu_when_its_device_is_cuda(device: str, gpus_in_cluster: bool, gpus: int) -> None:
    assert options(gpus_in_cluster, device=device)["ray_actor_options"]["num_gpus"] == gpus


@pytest.mark.parametrize(("max_batch_size", "queue_capacity"), [(1, 64), (8, 64), (32, 16), (64, 512)])
def test_a_replica_takes_enough_requests_for_the_engine_to_fill_batches_and_its_queue(
    max_batch_size: int, queue_capacity: int
) -> None:
    o = options(max_batch_size=max_batch_size, queue_capacity=queue_capacity, max_images_per_request=1)
    # the engine, not Ray, decides batches and answers 429 when its queue is full
    assert o["max_ongoing_requests"] >= max(4 * max_batch_size, queue_capacity + max_batch_size)
    assert o["autoscaling_config"]["target_ongoing_requests"] == 2 * max_batch_size


def test_ray_waits_for_the_drain_before_it_kills_a_stopping_replica() -> None:
    assert options(drain_grace_s=45)["graceful_shutdown_timeout_s"] == 45 + SHUTDOWN_MARGIN_S > 45


def test_the_builder_binds_the_deployment_with_options_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.ray_serve.deployment._gpus_in_cluster", lambda: False)
    app = build_app({"settings": {"max_batch_size": 4, "device": "cpu"}, "max_replicas": 2})
    assert isinstance(app, Application)
    deployment = app._bound_deployment  # Ray keeps no public accessor
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 0}
    assert deployment.max_ongoing_requests == 64 + 4 + 8
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 2, 8)


@pytest.mark.parametrize(
    "args",
    [
        {"settings": {"max_batch_size": 0}},
        {"settings": {"no_such_setting": 1}},
        {"min_replicas": 3, "max_replicas": 2},
        {"metrics_port": 70000},
        {"replicas": 2},
    ],
)
def test_the_builder_refuses_bad_arguments_at_deploy_time(args: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        build_app(args)


def test_the_arguments_table_of_docs_ray_serve_matches_the_builder() -> None:
    rows = table_with_header(ROOT / "docs" / "ray-serve.md", ["argument", "default", "what it sets"])
    documented = {unquote(name): yaml.safe_load(unquote(default)) for name, default, _ in rows}
    assert documented == RayServeArgs().model_dump(mode="json")
