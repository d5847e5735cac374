"""The service's life: load and compress the model, warm up, serve, drain. One instance per process.

Loading runs in the background so that /healthz answers at once and /readyz says 503 until the variants
are loaded, compressed and warmed up at every batch size. A drain that begins while loading or warming up is
final: the engine is never started and the service never becomes ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import torch

from app.compress.hardware import ISA_ENV
from app.serve.engine import Engine, Lifecycle, Phase, Unhealthy, auto_policy
from app.serve.http.encoding import MEDIA_TYPES
from app.serve.http.limits import Limits
from app.serve.http.schemas import CFG_MAX, SEED_MAX
from app.serve.metrics import ServeMetrics, versions
from app.serve.models import ServedModel, ServedVariant, load_model, resolve_device
from app.serve.settings import ServeSettings

log = logging.getLogger(__name__)


def compute_threads(setting: int, available: int) -> int:
    """Torch's CPU threads: the setting, or with 0 all but one of the `available` threads (torch's default,
    which follows OMP_NUM_THREADS, as Ray sets it per replica), at least one. The event loop, the HTTP parser
    and the image encoder need a core of their own: with every core computing, OpenMP's threads wait at their
    barriers for one that the encoder has preempted (measured in docs/benchmarks.md, "Serving")."""
    return setting or max(1, available - 1)


class Service:
    """The http layer's `Backend`: what its routes ask of the service."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = ServeMetrics(settings.variants, settings.max_batch_size, settings.max_images_per_request)
        self.lifecycle = Lifecycle()  # the engine's too, once built
        self.model: ServedModel | None = None
        self.engine: Engine | None = None
        self.limits: Limits | None = None
        self._loading: asyncio.Task[None] | None = None
        self._drained: asyncio.Task[None] | None = None
        self.metrics.healthy.set_function(lambda: float(self.health() is None))

    def start(self) -> None:
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="var-load")

    async def wait_loaded(self) -> None:
        if self._loading:
            await asyncio.shield(self._loading)

    async def _load(self) -> None:
        s = self.settings
        try:
            torch.set_num_threads(compute_threads(s.torch_threads, torch.get_num_threads()))
            if s.cpu_isa:  # the kernel table reads it from the environment (app/compress/hardware.py)
                os.environ[ISA_ENV] = s.cpu_isa
            t0 = time.monotonic()
            device = resolve_device(s.device)
            self.model = model = await asyncio.to_thread(
                load_model, s.model_dir, s.variants, device, calibrate_missing_plans=s.calibrate_missing_plans
            )
            if self._drain_began("loading"):
                return
            pipes = {name: v.pipeline for name, v in model.variants.items()}
            policy = auto_policy(model.config.var.embed_dim) if s.batching == "auto" else s.batching
            log.info("batching policy %s%s", policy, " (auto)" if s.batching == "auto" else "")
            engine = Engine(
                pipes,
                max_batch_size=s.max_batch_size,
                max_wait_s=s.max_wait_ms / 1000,
                queue_capacity=s.queue_capacity,
                metrics=self.metrics,
                watchdog_s=s.watchdog_s,
                policy=policy,
                overlap_decode=s.overlap_decode,
                lifecycle=self.lifecycle,
            )
            self.engine = engine
            self._describe(model)
            if s.warmup:
                await engine.warm_up(range(1, s.max_batch_size + 1), model.defaults)
            if self._drain_began("warm-up"):
                return
            engine.start()
        except Exception as e:
            log.exception("loading %s failed", s.model_dir)
            self.lifecycle.fail(f"{type(e).__name__}: {e}")
            return
        self.metrics.ready.set(1)
        log.info("ready: %s, variants %s on %s in %.1f s", s.model_dir, s.variants, device, time.monotonic() - t0)

    def _drain_began(self, stage: str) -> bool:
        began = self.lifecycle.phase is not Phase.LOADING
        if began:
            log.info("shutting down during %s: the engine is not started", stage)
        return began

    def _describe(self, model: ServedModel) -> None:
        s, m = self.settings, self.metrics
        cfg = model.config
        self.limits = Limits(
            num_classes=cfg.var.num_classes,
            class_names=cfg.class_names,
            vocab_size=cfg.var.vocab_size,
            variants=tuple(model.variants),
            default_variant=s.default_variant,
            defaults=model.defaults,
            max_images_per_request=s.max_images_per_request,
            default_timeout_s=s.default_timeout_s,
            max_timeout_s=s.max_timeout_s,
            class_synonyms=cfg.class_synonyms,
        )
        m.model_info.info({"model": model.name, "preset": cfg.name, "device": str(model.device), **versions()})
        for name, v in model.variants.items():
            passes = ",".join(p["name"] for p in v.spec.describe())
            info = {
                "passes": passes,
                "shares_vqvae": str(v.shares_vqvae).lower(),
                "window_plan": v.window_plan or "none",
                "sharing_plan": v.sharing_plan or "none",
            }
            m.variant_info.labels(name).info(info)
            m.weight_bytes.labels(name).set(v.weight_bytes)
            m.resident_bytes.labels(name).set(model.resident_bytes(name))
        m.shared_weight_bytes.set(model.shared_bytes)
        m.watch_gpu(model.device)

    @property
    def phase(self) -> Phase:
        return self.lifecycle.phase

    def ready_engine(self) -> tuple[Engine, Limits]:
        """The engine and limits, or NotAccepting (503) while loading, draining or after a failed load."""
        if (refusal := self.lifecycle.refusal()) is not None:
            raise refusal
        assert self.engine is not None and self.limits is not None, "ready: loaded"
        return self.engine, self.limits

    def health(self) -> Unhealthy | None:
        """None while alive; else why the process should be restarted: a failed load, or the engine's watchdog
        (a batch far past its expected time, a dead scheduler)."""
        if self.phase is Phase.FAILED:
            return Unhealthy("load_failed", self.lifecycle.error or "model failed to load", status="failed")
        return self.engine.health() if self.engine is not None else None

    def describe(self) -> dict[str, Any]:
        """GET /models: the model, every variant (passes, weight bytes), classes, defaults and limits."""
        assert self.model is not None and self.limits is not None
        m, s, lim = self.model, self.settings, self.limits
        names = lim.class_names or (None,) * lim.num_classes
        synonyms = lim.class_synonyms or ((),) * lim.num_classes
        limits = {
            "max_images_per_request": s.max_images_per_request,
            "max_batch_size": s.max_batch_size,
            "queue_capacity": s.queue_capacity,
            "max_body_bytes": s.max_body_bytes,
            "top_k_max": lim.vocab_size,
            "cfg_max": CFG_MAX,
            "seed_max": SEED_MAX,
            "default_timeout_s": s.default_timeout_s,
            "max_timeout_s": s.max_timeout_s,
            "formats": list(MEDIA_TYPES),
        }
        return {
            "model": {"name": m.name, "preset": m.config.name, "image_size": m.image_size},
            "device": str(m.device),
            "torch_threads": torch.get_num_threads(),
            "classes": [{"label": i, "name": name, "synonyms": list(synonyms[i])} for i, name in enumerate(names)],
            "default_variant": lim.default_variant,
            "variants": [_variant(v) for v in m.variants.values()],
            "shared_weight_bytes": m.shared_bytes,
            "defaults": dataclasses.asdict(lim.defaults),
            "limits": limits,
        }

    def drain(self) -> asyncio.Task[None]:
        """Stop accepting and let accepted work finish within drain_grace_s (idempotent)."""
        if self._drained is None:
            self.lifecycle.drain()  # at once: a load in progress sees it at its next stage
            self.metrics.ready.set(0)
            self._drained = asyncio.get_running_loop().create_task(self._drain(), name="var-drain")
        return self._drained

    async def _drain(self) -> None:
        if self.engine is not None:
            failed = await self.engine.drain(self.settings.drain_grace_s)
            log.info("drained; %d request(s) were not finished within the grace period", failed)

    async def stop(self) -> None:
        if self._loading and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        await self.drain()
        if self.engine is not None:
            await self.engine.stop()


def _variant(v: ServedVariant) -> dict[str, Any]:
    """A variant in GET /models: what it is for, its passes, its memory, where its window and sharing plans
    came from."""
    return {
        "name": v.name,
        "purpose": v.spec.purpose,
        "passes": v.spec.describe(),
        "weight_bytes": v.weight_bytes,
        "shares_vqvae": v.shares_vqvae,
        "window_plan": v.window_plan,
        "sharing_plan": v.sharing_plan,
    }
