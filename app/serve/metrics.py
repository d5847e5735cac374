"""Every Prometheus metric of the service, declared once, in one registry per service instance.

Label values are bounded: `variant` and `reference` take the configured variant names, `stage` the values of
`Stage` (the pipeline's stages and the API's encode), `scale` the model's scale indices, `status` HTTP status
codes the service answers with, `reason` the values of `Rejection` (of `FidelityDrop` for fidelity's drops).
A registry per instance (not the global one) lets tests build several services in one process.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from enum import StrEnum

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    Summary,
    generate_latest,
)

from app.model.timing import Stage
from app.quality.fidelity import Fidelity

# Renard's R10 series (10 edges per decade, each about 26% above the last) from 5 ms to 2.5 s, where the demo
# model's and a GPU's latencies lie, then coarse up to 300 s: 34 buckets. histogram_quantile interpolates
# within a bucket, so a quantile is off by at most one bucket's width.
LATENCY_BUCKETS = (
    *(0.005, 0.0063, 0.008),
    *(0.01, 0.0125, 0.016, 0.02, 0.025, 0.0315, 0.04, 0.05, 0.063, 0.08),
    *(0.1, 0.125, 0.16, 0.2, 0.25, 0.315, 0.4, 0.5, 0.63, 0.8),
    *(1.0, 1.25, 1.6, 2.0, 2.5),
    *(5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
UNKNOWN_VARIANT = "unknown"  # label of requests whose variant was not (validly) named
# Shadow fidelity: KL in nats per token, about three edges a decade from 1e-5 (bfloat16 matmuls on the demo model
# score about 1e-3, windowed attention about 0.1, guidance off at the last scale 0.5) to 10 (a broken variant);
# top-1 agreement in [0, 1], finer near 1, where good variants are. Measured: docs/serving.md#shadow-fidelity.
KL_BUCKETS = (*(float(f"{m}e{e}") for e in range(-5, 1) for m in (1, 2, 5)), 10.0)  # exact decimal edges
AGREEMENT_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)


class Rejection(StrEnum):
    """Why a request was not served: the values of the `reason` label of `var_rejections_total`. The HTTP layer
    maps each answer it refuses with to one (app/serve/http/errors.py)."""

    INVALID = "invalid"
    BODY_TOO_LARGE = "body_too_large"
    BODY_TIMEOUT = "body_timeout"  # the body came too slowly (408)
    UNAUTHORIZED = "unauthorized"  # no valid API key (401)
    NOT_ACCEPTABLE = "not_acceptable"
    QUEUE_FULL = "queue_full"
    NOT_READY = "not_ready"  # loading, the load failed, or the variant asked for is still starting or failed
    DRAINING = "draining"  # shutting down or stopped
    DEADLINE = "deadline"
    CLIENT_DISCONNECTED = "client_disconnected"
    FAILED = "failed"


class FidelityDrop(StrEnum):
    """Why a sampled request was not scored: the values of the `reason` label of `var_fidelity_dropped_total`."""

    BACKLOG_FULL = "backlog_full"  # the scorer was behind (the engine had no idle time for it)
    NO_REFERENCE = "no_reference"  # the reference variant is not serving (still starting, or failed)
    FAILED = "failed"  # scoring raised (logged)


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
        self._kv_cache_max: dict[str, int] = {}
        self._batch_peak_max: dict[str, int] = {}
        self.request_seconds = Histogram(
            "var_request_duration_seconds",
            "POST /generate answered with images (status 200), arrival to answer; refusals and errors are not observed",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "var_queue_wait_seconds",
            "arrival to the start of the request's first batch (scale policy: its first step)",
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
        self.step_seconds = Histogram(
            "var_step_duration_seconds",
            "scale policy: seconds of one step (one scale of every generation in flight, and its decodes)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows_admitted = Histogram(
            "var_step_admitted_images",
            "scale policy: images that joined the generations in flight at a step boundary",
            buckets=_count_buckets(max_batch_size),
            registry=r,
        )
        self.rows_by_scale = Gauge(
            "var_inflight_images_by_scale",
            "scale policy: images in flight per variant and the scale they compute next",
            ["variant", "scale"],
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
        self.batch_failures = Counter(
            "var_batch_failures_total", "batches (scale policy: cohorts) that raised", ["variant"], registry=r
        )
        self.queue_depth = Gauge("var_queue_depth_images", "images waiting for a batch", ["variant"], registry=r)
        self.inflight = Gauge(
            "var_inflight_images", "images being computed (in the batch, or in flight)", ["variant"], registry=r
        )
        self.weight_bytes = Gauge(
            "var_model_weight_bytes", "weights held for this variant alone", ["variant"], registry=r
        )
        self.shared_weight_bytes = Gauge(
            "var_shared_weight_bytes", "weights shared by several variants (the VQVAE when unchanged)", registry=r
        )
        self.resident_bytes = Gauge(
            "var_model_resident_bytes",
            "weights this variant computes with: its own plus the shared ones it uses (the sum over variants "
            "counts shared weights once per variant)",
            ["variant"],
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "var_kv_cache_bytes",
            "KV cache of the largest batch computed so far (warm-up included), from its tensors",
            ["variant"],
            registry=r,
        )
        self.batch_peak_bytes = Gauge(
            "var_batch_peak_memory_bytes",
            "most memory a batch held above what was held at its start, largest so far (warm-up included): on "
            "CUDA allocated device memory; on CPU growth of the process's resident set, a lower bound",
            ["variant"],
            registry=r,
        )
        self.gpu_allocated_bytes = Gauge("var_gpu_memory_allocated_bytes", "CUDA memory allocated", registry=r)
        self.gpu_reserved_bytes = Gauge("var_gpu_memory_reserved_bytes", "CUDA memory reserved", registry=r)
        self.model_info = Info("var_model", "the served model", registry=r)
        self.variant_info = Info("var_variant", "passes of each loaded variant", ["variant"], registry=r)
        self.ready = Gauge(
            "var_ready", "1 while the default variant serves (GET /readyz 200 unless unhealthy)", registry=r
        )
        self.variant_ready = Gauge(
            "var_variant_ready",
            "1 while the variant serves; 0 while it loads, calibrates or warms up, and once it failed (GET /models "
            "says which, and why)",
            ["variant"],
            registry=r,
        )
        self.healthy = Gauge(
            "var_healthy",
            "1 while GET /healthz answers 200; 0 after a failed load, while a batch runs far past its expected "
            "time, or once the engine's scheduler has died",
            registry=r,
        )
        self.oom = Counter(
            "var_oom_total",
            "batches (scale policy: cohorts) that ran out of memory; whole splits them in halves, "
            "scale retries each image alone",
            ["variant"],
            registry=r,
        )
        self.batch_limit = Gauge(
            "var_batch_limit_images",
            "most images the next batch may hold: max_batch_size, lower for a while after running out of memory",
            registry=r,
        )
        self.batch_limit.set(max_batch_size)
        self.nonfinite_images = Counter(
            "var_nonfinite_images_total",
            "images computed with NaN or infinite pixels (their requests failed with 500)",
            ["variant"],
            registry=r,
        )
        self.fidelity_kl = Histogram(
            "var_fidelity_kl",
            "shadow fidelity, per scored image: KL of the variant's next-token distributions from the reference's, "
            "in nats, the mean over the image's tokens, both teacher-forced on the variant's tokens (0: same model)",
            ["variant", "reference"],
            buckets=KL_BUCKETS,
            registry=r,
        )
        self.fidelity_agreement = Histogram(
            "var_fidelity_top1_agreement",
            "shadow fidelity, per scored image: share of its tokens where the variant's and the reference's most "
            "likely next token agree (1: the same model)",
            ["variant", "reference"],
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self.fidelity_scale_kl = Summary(
            "var_fidelity_scale_kl",
            "shadow fidelity by scale: the mean KL over a scored image's tokens of that scale (rate of _sum over "
            "rate of _count: the mean over images)",
            ["variant", "reference", "scale"],
            registry=r,
        )
        self.fidelity_scale_agreement = Summary(
            "var_fidelity_scale_top1_agreement",
            "shadow fidelity by scale: the top-1 agreement over a scored image's tokens of that scale",
            ["variant", "reference", "scale"],
            registry=r,
        )
        self.fidelity_scored = Counter(
            "var_fidelity_samples_total", "sampled requests scored", ["variant", "reference"], registry=r
        )
        self.fidelity_dropped = Counter(
            "var_fidelity_dropped_total", "sampled requests not scored, by reason", ["variant", "reason"], registry=r
        )
        for reason in Rejection:
            self.rejections.labels(reason)  # exported at 0 from the start
        for v in self.variants:  # exported at 0 from the start, so that rate() sees the first increase
            self.images_generated.labels(v)
            self.batch_failures.labels(v)
            self.oom.labels(v)
            self.nonfinite_images.labels(v)
            self.requests.labels(v, "200")
            self.request_seconds.labels(v)
            self.queue_wait_seconds.labels(v)
            self.batch_size.labels(v)
            self.images_per_request.labels(v)
            for stage in Stage:
                self.stage_seconds.labels(v, stage)

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

    def record_batch(self, variant: str, size: int, stage_s: dict[Stage, float]) -> None:
        self.batch_size.labels(variant).observe(size)
        self.images_generated.labels(variant).inc(size)
        for stage, seconds in stage_s.items():
            self.stage_seconds.labels(variant, stage).observe(seconds)

    def record_step(self, seconds: float, admitted: int, by_scale: dict[tuple[str, int], int]) -> None:
        """One step of the scale policy; `by_scale`: images in flight per (variant, next scale) after it."""
        self.step_seconds.observe(seconds)
        self.rows_admitted.observe(admitted)
        for (variant, scale), n in by_scale.items():
            self.rows_by_scale.labels(variant, str(scale)).set(n)

    def record_memory(self, variant: str, kv_cache_bytes: int, peak_bytes: int | None) -> None:
        """Raise the variant's high-water marks of KV cache and batch memory (peak_bytes None: not measured)."""
        kv = self._kv_cache_max[variant] = max(self._kv_cache_max.get(variant, 0), kv_cache_bytes)
        self.kv_cache_bytes.labels(variant).set(kv)
        if peak_bytes is not None:
            peak = self._batch_peak_max[variant] = max(self._batch_peak_max.get(variant, 0), peak_bytes)
            self.batch_peak_bytes.labels(variant).set(peak)

    def watch_fidelity(self, reference: str, scales: int) -> None:
        """Export shadow fidelity's series of every variant but the reference at 0 from the start, those of its
        `scales` scales too, so that rate() sees the first sample scored."""
        for v in self.variants:
            if v == reference:
                continue
            self.fidelity_kl.labels(v, reference)
            self.fidelity_agreement.labels(v, reference)
            self.fidelity_scored.labels(v, reference)
            for scale in range(scales):
                self.fidelity_scale_kl.labels(v, reference, str(scale))
                self.fidelity_scale_agreement.labels(v, reference, str(scale))
            for reason in FidelityDrop:
                self.fidelity_dropped.labels(v, reason)

    def record_fidelity(self, variant: str, reference: str, fidelity: Fidelity) -> None:
        self.fidelity_kl.labels(variant, reference).observe(fidelity.kl)
        self.fidelity_agreement.labels(variant, reference).observe(fidelity.top1_agreement)
        for s in fidelity.scales:
            self.fidelity_scale_kl.labels(variant, reference, str(s.scale)).observe(s.kl)
            self.fidelity_scale_agreement.labels(variant, reference, str(s.scale)).observe(s.top1_agreement)
        self.fidelity_scored.labels(variant, reference).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("var-serve")
    except PackageNotFoundError:
        app_version = "unknown"
    return {"app_version": app_version, "torch_version": torch.__version__, "python_version": platform.python_version()}
