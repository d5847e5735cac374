"""The service as a Ray Serve deployment: each replica runs the app of `create_app`, with its own engine.

Every replica builds the same FastAPI app as `python -m app.serve` (the composition root, `create_app`) from
`ServeSettings` read in the replica: the VAR_* variables of its environment (the Serve config's
`runtime_env.env_vars`), overridden field by field by the builder's `settings` argument. Ray's HTTP proxy
forwards requests to the app unchanged, so every route, error and limit is the app's own, and batching stays
per replica: each has its engine and worker thread.

Lifecycle: Ray runs the app's lifespan in the replica. Its startup starts loading; the replica additionally
waits there until every variant has started or failed (not only the default one, which makes the service
ready: Ray routes by replica, not by variant), so Ray routes nothing to a replica that would answer 503 for
a variant still starting, and a failed load fails the replica (Ray retries it and reports the cause). On
shutdown Ray stops routing to the replica and waits for its ongoing requests (up to
`graceful_shutdown_timeout_s`, set above VAR_DRAIN_GRACE_S); then the lifespan's shutdown drains the service
within VAR_DRAIN_GRACE_S and stops the engine.

Nothing in the product imports this module; it is a deployment entry like `app/serve/__main__.py`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import ray
import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application, Deployment

from app.ray_serve.targets import MetricsTarget, serve_metrics
from app.serve.app import create_app
from app.serve.engine import Phase
from app.serve.service import Service
from app.serve.settings import ServeSettings

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "var-serve"
# Ray waits this much beyond VAR_DRAIN_GRACE_S before it kills a stopping replica: the drain's own
# bookkeeping and the engine's stop
SHUTDOWN_MARGIN_S = 10.0
# ongoing requests a replica takes beyond its engine's queue and batch: /healthz, /readyz, /metrics, /models
CHEAP_ROUTES_HEADROOM = 8
DEFAULT_TARGETS_DIR = Path("/tmp/var-serve/prometheus-targets")


class RayServeArgs(BaseModel):
    """The application builder's arguments (`args:` in a Serve config): how Ray places and scales replicas and
    where their metrics go. The service itself is configured by VAR_* variables, and by `settings` over them."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict, description="ServeSettings fields that override the replica's VAR_* variables"
    )
    min_replicas: int = Field(default=1, ge=0, description="autoscaling's lower bound")
    max_replicas: int = Field(default=4, ge=1, description="autoscaling's upper bound")
    num_cpus: float = Field(default=1, gt=0, description="CPUs reserved per replica (Ray sets OMP_NUM_THREADS)")
    metrics_port: int = Field(default=9500, ge=0, le=65535, description="first port tried for a replica's metrics")
    metrics_bind: str = Field(default="0.0.0.0", description="address the replicas' metrics endpoints listen on")
    metrics_targets_dir: Path | None = Field(
        default=DEFAULT_TARGETS_DIR, description="where replicas write Prometheus file_sd targets (null: none)"
    )

    @model_validator(mode="after")
    def _check(self) -> RayServeArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        ServeSettings(**self.settings)  # a mistyped field fails here, at deploy time, not in every replica
        return self


def uses_gpu(device: str, gpus_in_cluster: bool) -> bool:
    if device == "auto":
        return gpus_in_cluster
    return device.startswith("cuda")


def deployment_options(settings: ServeSettings, args: RayServeArgs, gpus_in_cluster: bool) -> dict[str, Any]:
    """Ray Serve options from the service's settings: one GPU per replica when the device is CUDA; room for
    the engine's whole queue plus a batch per replica, so that the engine, not Ray, fills batches and answers
    429 when full; scaling out when a replica holds more than two batches' worth of requests."""
    b = settings.max_batch_size
    return {
        "ray_actor_options": {
            "num_cpus": args.num_cpus,
            "num_gpus": 1 if uses_gpu(settings.device, gpus_in_cluster) else 0,
        },
        "max_ongoing_requests": max(4 * b, settings.queue_capacity + b) + CHEAP_ROUTES_HEADROOM,
        "autoscaling_config": {
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": 2 * b,
        },
        "graceful_shutdown_timeout_s": settings.drain_grace_s + SHUTDOWN_MARGIN_S,
    }


def _gpus_in_cluster() -> bool:
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()


class VarServeReplica:
    """One replica: the app of the composition root, ready before Ray routes to it, its metrics on a port of
    its own. `VarServe` below is this class as a Serve deployment with the app as its ingress."""

    def __init__(self, args: dict[str, Any]):
        a = RayServeArgs.model_validate(args)
        settings = ServeSettings(**a.settings)
        _configure_logging(settings.log_level)
        # not `self.app`: Ray's ingress wrapper has a read-only property of that name
        self.web_app = create_app(settings)
        self.service: Service = self.web_app.state.service
        self.metrics_target: MetricsTarget | None = None
        router = self.web_app.router
        router.lifespan_context = _until_ready(router.lifespan_context, self.service, lambda: self._serve_metrics(a))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.web_app

    def _serve_metrics(self, a: RayServeArgs) -> None:
        """Once ready: the registry on a port of its own, and a target file naming it (no file, no scrape, for a
        replica that never became ready)."""
        context = serve.get_replica_context()
        labels = {
            "ray_app": context.app_name,
            "ray_deployment": context.deployment,
            "ray_replica": context.replica_tag,
            "ray_node": ray.get_runtime_context().get_node_id(),
        }
        self.metrics_target = serve_metrics(
            self.service.metrics.registry,
            bind=a.metrics_bind,
            first_port=a.metrics_port,
            node_ip=ray.util.get_node_ip_address(),
            targets_dir=a.metrics_targets_dir,
            name=f"{context.app_name}-{context.deployment}-{context.replica_tag}",
            labels=labels,
        )
        log.info("replica metrics on %s", self.metrics_target.address)

    def __del__(self) -> None:
        # Ray calls this after the app's lifespan shutdown (the drain); Python may call it again at exit
        target = getattr(self, "metrics_target", None)
        if target is not None:
            self.metrics_target = None
            target.close()


# `@serve.ingress()` without an app: Ray asks the replica for it (`__serve_build_asgi_app__`) after __init__
VarServe: Deployment = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(VarServeReplica))

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def _until_ready(lifespan: Lifespan, service: Service, on_ready: Callable[[], None]) -> Lifespan:
    """The app's lifespan, whose startup also waits for the service to be ready (then calls `on_ready`), or
    raises why it is not."""

    @asynccontextmanager
    async def until_ready(app: Any) -> AsyncIterator[Any]:
        async with lifespan(app) as state:
            await service.wait_loaded()
            if service.phase is not Phase.READY:
                raise RuntimeError(f"the service did not become ready ({service.phase}): {service.lifecycle.error}")
            on_ready()
            yield state

    return until_ready


def _configure_logging(level: str) -> None:
    """The app's loggers to the replica's stderr (Ray keeps it in the replica's log file)."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application (`import_path: app.ray_serve:build_app`); `args` are `RayServeArgs`."""
    a = RayServeArgs.model_validate(args)
    settings = ServeSettings(**a.settings)
    options = deployment_options(settings, a, _gpus_in_cluster())
    return VarServe.options(**options).bind(a.model_dump(mode="json"))
