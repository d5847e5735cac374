"""The Ray Serve deployment: its files against the code and each other, then a local Ray Serve on CPU.

Files: docker/ray/serve_config.yaml is a valid Serve config whose import path builds the deployment and whose
env vars are valid ServeSettings; docker/ray/rayservice.yaml embeds its applications; docker/ray/prometheus.yml
reads the replicas' target files. Live (marked slow): a local Ray on 2 CPUs bound to 127.0.0.1, two
replicas of the demo model behind Serve's HTTP proxy on a free loopback port: images over HTTP, every
replica's metrics reachable through its target file, a stopping replica finishing accepted work, a failed
load failing the deployment, and no Ray process left afterwards.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from app.bench.launcher import free_port
from app.bench.prometheus_text import Samples, scrape, total
from app.ray_serve import DEPLOYMENT_NAME, RayServeArgs, build_app, deployment_options
from app.ray_serve.targets import read_targets
from app.serve.settings import ServeSettings
from tests.conftest import DEMO, ROOT

RAY_DIR = ROOT / "docker" / "ray"
SERVE_CONFIG = RAY_DIR / "serve_config.yaml"
RAYSERVICE = RAY_DIR / "rayservice.yaml"
PROMETHEUS = RAY_DIR / "prometheus.yml"
RAY_DOCKERFILE = RAY_DIR / "Dockerfile"
# what the RayService's application may differ in from serve_config.yaml's (its header says why)
RAYSERVICE_ONLY_ENV = {"VAR_DEVICE": "cuda"}


def serve_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(SERVE_CONFIG.read_text())
    return config


def the_application(config: dict[str, Any]) -> dict[str, Any]:
    (application,) = config["applications"]
    return application  # type: ignore[no-any-return]


def rayservice_documents() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RAYSERVICE.read_text())}


def var_environment(monkeypatch: pytest.MonkeyPatch, env_vars: dict[str, str]) -> None:
    """Exactly these VAR_* variables in the environment (none of the shell's)."""
    for name in [n for n in os.environ if n.startswith("VAR_")]:
        monkeypatch.delenv(name)
    for name, value in env_vars.items():
        monkeypatch.setenv(name, value)


# --- files --------------------------------------------------------------------------------------------------


def test_serve_config_is_a_valid_serve_config() -> None:
    ServeDeploySchema.model_validate(serve_config())


def test_serve_config_import_path_builds_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    application = the_application(serve_config())
    module, _, attr = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder is build_app and len(inspect.signature(builder).parameters) == 1  # Ray's builder contract
    var_environment(monkeypatch, application["runtime_env"]["env_vars"])
    app = builder(application["args"])
    assert isinstance(app, Application) and app._bound_deployment.name == DEPLOYMENT_NAME


def test_serve_config_env_vars_are_valid_serve_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env_vars = the_application(serve_config())["runtime_env"]["env_vars"]
    fields = {f"VAR_{name.upper()}" for name in ServeSettings.model_fields}
    assert set(env_vars) <= fields, f"not settings: {set(env_vars) - fields}"
    assert all(isinstance(v, str) for v in env_vars.values()), "env var values must be YAML strings"
    var_environment(monkeypatch, env_vars)
    settings = ServeSettings()
    assert settings.max_batch_size == int(env_vars["VAR_MAX_BATCH_SIZE"])


def test_rayservice_embeds_the_serve_config(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rayservice_documents()
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    config = serve_config()
    assert embedded["proxy_location"] == config["proxy_location"]
    expected = the_application(config)
    expected["runtime_env"]["env_vars"] |= RAYSERVICE_ONLY_ENV
    assert the_application(embedded) == expected


def test_rayservice_gives_each_replica_a_gpu_pod_that_outlives_its_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    service = rayservice_documents()["RayService"]
    application = the_application(yaml.safe_load(service["spec"]["serveConfigV2"]))
    var_environment(monkeypatch, application["runtime_env"]["env_vars"])
    args = RayServeArgs.model_validate(application["args"])
    options = deployment_options(ServeSettings(), args, gpus_in_cluster=False)
    assert options["ray_actor_options"]["num_gpus"] == 1
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one replica per pod
    assert workers["maxReplicas"] >= args.max_replicas
    assert pod["terminationGracePeriodSeconds"] > options["graceful_shutdown_timeout_s"]
    metrics_port = {p["name"]: p["containerPort"] for p in container["ports"]}["var-metrics"]
    assert metrics_port == args.metrics_port
    monitor = rayservice_documents()["PodMonitor"]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["var-metrics"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= workers["template"]["metadata"]["labels"].items() | {
        ("ray.io/node-type", "worker")
    }


def test_ray_versions_agree() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert extra == [f"ray[serve]=={ray.__version__}"]
    assert rayservice_documents()["RayService"]["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert f"ARG RAY_VERSION={ray.__version__}" in RAY_DOCKERFILE.read_text()


def test_prometheus_reads_the_target_files_the_replicas_write(tmp_path: Path) -> None:
    assert_prometheus_accepts(PROMETHEUS)
    job = only_job(PROMETHEUS)
    (sd,) = job["file_sd_configs"]
    args = RayServeArgs.model_validate(the_application(serve_config())["args"])
    assert sd["files"] == [f"{args.metrics_targets_dir}/*.json"]


def only_job(config: Path) -> dict[str, Any]:
    (job,) = yaml.safe_load(config.read_text())["scrape_configs"]
    return job  # type: ignore[no-any-return]


def assert_prometheus_accepts(config: Path) -> None:
    """`promtool check config` (Debian package prometheus, which `make test` installs): the config, and the
    file_sd files it names, as Prometheus would read them."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: `make debian-packages` installs it (Debian package prometheus)"
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- a local Ray Serve ----------------------------------------------------------------------------------------

APP_NAME = "var-serve"
REPLICAS = 2  # one CPU each: the whole of ray.init(num_cpus=2)
# from the replicas' environment (runtime_env), not from the builder's arguments: the replica reads both
ENV_TIMEOUT_S = 50.0


@dataclass
class LocalServe:
    url: str
    targets_dir: Path
    args: dict[str, Any]

    def deploy(self) -> None:
        """The application as serve_config.yaml has it, but 2 fixed replicas of the demo model on loopback; a
        no-op while it runs. Returns once every replica is ready (they wait for their model)."""
        if APP_NAME in serve.status().applications:
            return
        serve.run(build_app(self.args), name=APP_NAME, route_prefix="/", blocking=False)

    def replica_metrics(self) -> dict[str, Samples]:
        """Each replica's samples, scraped where its target file says, as Prometheus does."""
        return {address: scrape(f"http://{address}/metrics") for address in read_targets(self.targets_dir)}


def generate(url: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/generate", json={"class_label": seed % 10, "seed": seed}, timeout=60)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def wait_for(condition: str, check: Callable[[], bool], limit_s: float = 60) -> None:
    end = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {condition}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def local_serve() -> Iterator[LocalServe]:
    before = descendants(os.getpid())
    # short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket address
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    settings = {"model_dir": str(DEMO), "variants": ["baseline"], "device": "cpu", "warmup": False}
    args = the_application(serve_config())["args"] | {
        "settings": settings | {"max_batch_size": 2, "max_wait_ms": 0},
        "min_replicas": REPLICAS,
        "max_replicas": REPLICAS,
        "metrics_bind": "127.0.0.1",
        "metrics_port": 0,
        "metrics_targets_dir": str(temp / "targets"),
    }
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network
            ray.init(
                num_cpus=REPLICAS,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                _temp_dir=str(temp),
                log_to_driver=False,
                runtime_env={"env_vars": {"VAR_DEFAULT_TIMEOUT_S": str(ENV_TIMEOUT_S)}},
            )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield LocalServe(f"http://127.0.0.1:{port}", temp / "targets", args)
    finally:
        ray_processes = descendants(os.getpid()) - before
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        wait_for("Ray's processes to exit", lambda: not alive(ray_processes), limit_s=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def deployed(local_serve: LocalServe) -> LocalServe:
    local_serve.deploy()
    return local_serve


@pytest.mark.slow
def test_images_through_rays_proxy_as_from_the_service_itself(deployed: LocalServe) -> None:
    url = deployed.url
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    assert ready["status"] == "ready" and ready["variants"]["baseline"]["state"] == "ready"
    png = httpx.post(f"{url}/generate", json={"class_name": "Sneaker"}, headers={"Accept": "image/png"}, timeout=60)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG") and png.headers["x-variant"] == "baseline"
    answer = httpx.post(f"{url}/generate", json={"class_label": 3, "num_images": 3}, timeout=60).json()
    assert len(answer["images"]) == 3 and sum(answer["batch_sizes"]) >= 3
    limits = httpx.get(f"{url}/models", timeout=10).json()["limits"]
    assert limits["max_batch_size"] == 2  # the builder's settings
    assert limits["default_timeout_s"] == ENV_TIMEOUT_S  # the replica's environment
    invalid = httpx.post(f"{url}/generate", json={"class_label": 10}, timeout=10)
    assert invalid.status_code == 422 and "class_label" in invalid.text
    too_big = httpx.post(f"{url}/generate", content=b"{" + b" " * 20_000 + b"}", timeout=10)
    assert too_big.status_code == 413


@pytest.mark.slow
def test_every_replica_serves_its_metrics_where_its_target_file_says(deployed: LocalServe, tmp_path: Path) -> None:
    before = deployed.replica_metrics()
    assert len(before) == REPLICAS, f"target files: {list(before)}"
    assert all(total(samples, "var_ready") == 1 for samples in before.values())
    requests = 8
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda seed: generate(deployed.url, seed), range(requests)))
    assert [a.status_code for a in answers] == [200] * requests
    after = deployed.replica_metrics()
    assert after.keys() == before.keys()
    answered = sum(
        total(after[a], "var_requests_total", status="200") - total(before[a], "var_requests_total", status="200")
        for a in after
    )
    assert answered == requests  # every request counted by exactly one replica, and every replica reachable
    # Prometheus accepts the files as they are: the job of docker/ray/prometheus.yml, pointed at this test's folder
    config = tmp_path / "prometheus.yml"
    config.write_text(
        PROMETHEUS.read_text().replace(
            only_job(PROMETHEUS)["file_sd_configs"][0]["files"][0], f"{deployed.targets_dir}/*.json"
        )
    )
    assert_prometheus_accepts(config)


@pytest.mark.slow
def test_a_stopping_replica_finishes_accepted_work(deployed: LocalServe) -> None:
    """Deleting the application stops every replica: Ray stops routing to them and waits for their ongoing
    requests, then the service drains. An accepted request of 16 images (8 batches of 2) still comes back."""

    def busy() -> bool:
        return any(
            total(samples, "var_inflight_images") + total(samples, "var_queue_depth_images") > 0
            for samples in deployed.replica_metrics().values()
        )

    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(
            httpx.post, f"{deployed.url}/generate", json={"class_label": 1, "num_images": 16}, timeout=120
        )
        wait_for("the request to reach a replica's engine", busy)
        serve.delete(APP_NAME, _blocking=False)
        answer = accepted.result(timeout=120)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 16
    wait_for("the application to be deleted", lambda: APP_NAME not in serve.status().applications)
    assert read_targets(deployed.targets_dir) == []  # every stopped replica removed its target file


@pytest.mark.slow
def test_a_replica_whose_model_fails_to_load_fails_the_deployment(local_serve: LocalServe, tmp_path: Path) -> None:
    """The replica waits for its model before Ray routes to it; a load that fails fails the replica (Ray
    retries, then gives up) instead of serving 503 forever, and leaves no metrics target behind."""
    args = local_serve.args | {
        "settings": local_serve.args["settings"] | {"model_dir": str(tmp_path / "no-such-model")},
        "min_replicas": 1,
        "max_replicas": 1,
        "num_cpus": 0.1,  # schedulable beside the other test's replicas
        "metrics_targets_dir": str(tmp_path / "targets"),
    }
    try:
        with pytest.raises(RuntimeError, match="Deploying application broken failed"):
            serve.run(build_app(args), name="broken", route_prefix="/broken", blocking=False)
    finally:
        serve.delete("broken")
    assert not (tmp_path / "targets").exists()
