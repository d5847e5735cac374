"""Every Prometheus metric of the service, declared once, in one registry per service instance.

Label values are bounded: `variant` takes the configured variant names, `stage` the pipeline's stages,
`status` HTTP status codes the service answers with, `reason` the fixed rejection reasons below.
A registry per instance (not the global one) lets tests build several services in one process.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

STAGES = ("transformer", "sampling", "latent", "decode", "encode")
REJECTION_REASONS = (
    "invalid",
    "body_too_large",
    "not_acceptable",
    "queue_full",
    "not_ready",
    "draining",
    "deadline",
    "client_disconnected",
    "failed",
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
UNKNOWN_VARIANT = "unknown"  # label of requests whose variant was not (validly) named


def _count_buckets(limit: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to and including limit: bucket edges for counts of images."""
    edges, e = [], 1
    while e < limit:
        edges.append(float(e))
        e *= 2
    return (*edges, float(limit))


class ServeMetrics:
    def __init__(self, variants: Sequence[str], max_batch_size: int, max_images_per_request: int):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        PlatformCollector(registry=r)
        self.variants = tuple(variants)
        self.request_seconds = Histogram(
            "var_request_duration_seconds",
            "POST /generate, arrival to answer",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "var_queue_wait_seconds",
            "arrival to the start of the request's first batch",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "var_stage_duration_seconds",
            "seconds per batch and stage (encode: per request)",
            ["variant", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "var_batch_size_images",
            "images per computed batch",
            ["variant"],
            buckets=_count_buckets(max_batch_size),
            registry=r,
        )
        self.images_per_request = Histogram(
            "var_request_images",
            "images asked for per accepted request",
            ["variant"],
            buckets=_count_buckets(max_images_per_request),
            registry=r,
        )
        self.requests = Counter("var_requests_total", "answered POST /generate", ["variant", "status"], registry=r)
        self.rejections = Counter("var_rejections_total", "requests not served, by reason", ["reason"], registry=r)
        self.images_generated = Counter("var_images_generated_total", "images computed", ["variant"], registry=r)
        self.batch_failures = Counter("var_batch_failures_total", "batches that raised", ["variant"], registry=r)
        self.queue_depth = Gauge("var_queue_depth_images", "images waiting for a batch", ["variant"], registry=r)
        self.inflight = Gauge("var_inflight_images", "images in the batch being computed", ["variant"], registry=r)
        self.weight_bytes = Gauge(
            "var_model_weight_bytes", "weights held for this variant alone", ["variant"], registry=r
        )
        self.shared_weight_bytes = Gauge(
            "var_shared_weight_bytes", "weights shared by several variants (the VQVAE when unchanged)", registry=r
        )
        self.gpu_allocated_bytes = Gauge("var_gpu_memory_allocated_bytes", "CUDA memory allocated", registry=r)
        self.gpu_reserved_bytes = Gauge("var_gpu_memory_reserved_bytes", "CUDA memory reserved", registry=r)
        self.model_info = Info("var_model", "the served model", registry=r)
        self.variant_info = Info("var_variant", "passes of each loaded variant", ["variant"], registry=r)
        self.ready = Gauge("var_ready", "1 when loaded, warmed up and accepting", registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)  # exported at 0 from the start
        for v in self.variants:
            self.images_generated.labels(v)
            self.batch_failures.labels(v)

    def label(self, variant: str | None) -> str:
        """A variant name safe to use as a label value (clients cannot create new series)."""
        return variant if variant in self.variants else UNKNOWN_VARIANT

    def watch_queue(self, variant: str, queued: Callable[[], int], inflight: Callable[[], int]) -> None:
        self.queue_depth.labels(variant).set_function(queued)
        self.inflight.labels(variant).set_function(inflight)

    def watch_gpu(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.gpu_allocated_bytes.set_function(lambda: torch.cuda.memory_allocated(device))
            self.gpu_reserved_bytes.set_function(lambda: torch.cuda.memory_reserved(device))

    def record_batch(self, variant: str, size: int, stage_s: dict[str, float]) -> None:
        self.batch_size.labels(variant).observe(size)
        self.images_generated.labels(variant).inc(size)
        for stage, seconds in stage_s.items():
            self.stage_seconds.labels(variant, stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("var-serve")
    except PackageNotFoundError:
        app_version = "unknown"
    return {"app_version": app_version, "torch_version": torch.__version__, "python_version": platform.python_version()}
