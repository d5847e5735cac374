"""The service's life: load the checkpoint, start its variants, serve, drain. One instance per process.

Loading runs in the background so that /healthz answers at once. The variants start one at a time, the
default first (app/serve/startup.py): the engine starts with the default variant, the service is ready
(/readyz 200) from then on, and each other variant joins the running engine once its plans, passes and
warm-up are done; until then a request for it gets 503 naming what it waits for. A variant that fails to
start is reported failed while the others serve; the default one failing fails the load. A drain that begins
before the default variant serves is final: the engine is never started and the service never becomes ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any

import torch

from app.compress import variant_spec
from app.compress.hardware import ISA_ENV
from app.serve.engine import (
    Engine,
    Lifecycle,
    NotAccepting,
    NotReady,
    Phase,
    Unhealthy,
    VariantState,
    VariantStatus,
    auto_policy,
    fail_unsettled,
)
from app.serve.engine.lifecycle import LOADING_RETRY_AFTER_S
from app.serve.engine.threads import in_own_thread
from app.serve.http.encoding import MEDIA_TYPES
from app.serve.http.limits import Limits
from app.serve.http.schemas import CFG_MAX, SEED_MAX
from app.serve.metrics import ServeMetrics, versions
from app.serve.models import ServedModel, ServedVariant, load_checkpoint, resolve_device
from app.serve.quality_metrics import export_quality
from app.serve.settings import ServeSettings
from app.serve.startup import Startup, StartupSettings

log = logging.getLogger(__name__)


def set_torch_threads(setting: int) -> None:
    """Torch's CPU threads: the setting, or with 0 torch's default, every CPU this process may use (it follows
    OMP_NUM_THREADS, which Ray sets to a replica's num_cpus, and the CPU affinity, which `taskset` and container
    CPU sets give). The event loop, the HTTP parser and the encoder take little beside a generation, and the one
    OpenMP team (`engine/threads.py`) keeps the worker's threads fast while they run: on 2 cores, 2 threads
    served a lone request 1.1-1.3x faster and 16 clients 1.4-1.7x more images per second than 1 thread
    (docs/benchmarks.md, "Serving")."""
    if setting:
        torch.set_num_threads(setting)


class Service:
    """The http layer's `Backend`: what its routes ask of the service."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = ServeMetrics(settings.variants, settings.max_batch_size, settings.max_images_per_request)
        self.lifecycle = Lifecycle()  # the engine's too, once built
        self.variants = {name: VariantStatus(name) for name in settings.variants}  # the engine's too
        self.model: ServedModel | None = None
        self.engine: Engine | None = None
        self.limits: Limits | None = None
        self._loading: asyncio.Task[None] | None = None
        self._drained: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()  # when loading began
        self.metrics.healthy.set_function(lambda: float(self.health() is None))
        for name, status in self.variants.items():
            self.metrics.variant_ready.labels(name).set_function(functools.partial(_serves, status))

    def start(self) -> None:
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="var-load")

    async def wait_loaded(self) -> None:
        """Until every variant has started or failed (or the load failed, or a drain stopped it)."""
        if self._loading:
            await asyncio.shield(self._loading)

    async def _load(self) -> None:
        s = self.settings
        try:
            set_torch_threads(s.torch_threads)
            if s.cpu_isa:  # the kernel table reads it from the environment (app/compress/hardware.py)
                os.environ[ISA_ENV] = s.cpu_isa
            self._t0 = time.monotonic()
            device = resolve_device(s.device)
            self.model = model = await in_own_thread(load_checkpoint, s.model_dir, device)
            if self._drain_began("loading"):
                fail_unsettled(self.variants.values(), "not started: the service is shutting down")
                return
            self._describe(model)
            startup = StartupSettings(
                tuple(s.variants),
                s.default_variant,
                s.calibrate_missing_plans,
                s.warmup,
                s.max_batch_size,
                s.compile_cache,
            )
            await Startup(model, startup, self.variants, self.metrics, self._serve, self._starting).run()
        except Exception as e:
            if self.phase is not Phase.LOADING:  # the default variant served, or a drain began: not a failed load
                log.exception("starting the variants of %s failed", s.model_dir)
                return
            log.exception("loading %s failed", s.model_dir)
            self.lifecycle.fail(f"{type(e).__name__}: {e}")
            fail_unsettled(self.variants.values(), "not started: the load failed")

    def _starting(self) -> bool:
        """Whether variants may still start: not once a drain began (or the load failed)."""
        return self.phase in (Phase.LOADING, Phase.READY)

    def _drain_began(self, stage: str) -> bool:
        began = self.lifecycle.phase is not Phase.LOADING
        if began:
            log.info("shutting down during %s: the engine is not started", stage)
        return began

    async def _serve(self, variant: ServedVariant) -> None:
        """A variant that has started: the engine starts with the first (the default), the others join it.
        Called only while `_starting` (a drain that began before the default variant served is final)."""
        assert self.model is not None
        self.model.add(variant)
        self._describe_variants(self.model)
        if self.engine is not None:
            await self.engine.add_variant(variant.name, variant.pipeline)
            return
        s = self.settings
        policy = auto_policy(self.model.config.var.embed_dim) if s.batching == "auto" else s.batching
        log.info("batching policy %s%s", policy, " (auto)" if s.batching == "auto" else "")
        self.engine = Engine(
            {variant.name: variant.pipeline},
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            queue_capacity=s.queue_capacity,
            metrics=self.metrics,
            watchdog_s=s.watchdog_s,
            policy=policy,
            overlap_decode=s.overlap_decode,
            lifecycle=self.lifecycle,
            variants=self.variants,
            fidelity_rate=_fidelity_rate(s),
            fidelity_reference=s.fidelity_reference,
        )
        self.engine.start()
        self.metrics.ready.set(1)
        log.info(
            "ready: %s, default variant %s on %s in %.1f s", s.model_dir, variant.name, self.model.device,
            time.monotonic() - self._t0,
        )  # fmt: skip

    def _describe(self, model: ServedModel) -> None:
        s, m = self.settings, self.metrics
        cfg = model.config
        self.limits = Limits(
            num_classes=cfg.var.num_classes,
            class_names=cfg.class_names,
            vocab_size=cfg.var.vocab_size,
            variants=tuple(s.variants),  # those still starting too: their requests get 503, not 422
            default_variant=s.default_variant,
            defaults=model.defaults,
            max_images_per_request=s.max_images_per_request,
            default_timeout_s=s.default_timeout_s,
            max_timeout_s=s.max_timeout_s,
            class_synonyms=cfg.class_synonyms,
        )
        m.model_info.info({"model": model.name, "preset": cfg.name, "device": str(model.device), **versions()})
        m.watch_gpu(model.device)
        export_quality(model.folder, s.variants, m.registry)

    def _describe_variants(self, model: ServedModel) -> None:
        """The metrics of the variants built so far (a variant sharing the VQVAE changes what is shared)."""
        m = self.metrics
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

    @property
    def phase(self) -> Phase:
        return self.lifecycle.phase

    def ready_engine(self) -> tuple[Engine, Limits]:
        """The engine and limits, or NotAccepting (503) while loading, draining or after a failed load."""
        if (refusal := self.lifecycle.refusal()) is not None:
            raise self._while_loading(refusal)
        assert self.engine is not None and self.limits is not None, "ready: loaded"
        return self.engine, self.limits

    def _while_loading(self, refusal: NotAccepting) -> NotAccepting:
        """While loading, the refusal names what the default variant (which readiness waits for) is doing."""
        if self.phase is not Phase.LOADING:
            return refusal
        default = self.variants[self.settings.default_variant]
        why = default.refusal()
        retry_after_s = why.retry_after_s if why is not None else LOADING_RETRY_AFTER_S
        return NotReady(f"loading (default variant {default.name} {default.describe()})", retry_after_s)

    def health(self) -> Unhealthy | None:
        """None while alive; else why the process should be restarted: a failed load, or the engine's watchdog
        (a batch far past its expected time, a dead scheduler)."""
        if self.phase is Phase.FAILED:
            return Unhealthy("load_failed", self.lifecycle.error or "model failed to load", status="failed")
        return self.engine.health() if self.engine is not None else None

    def variant_states(self) -> dict[str, dict[str, Any]]:
        """Per configured variant: its state, what it does, its progress, its error (/readyz, /models)."""
        return {name: status.as_dict() for name, status in self.variants.items()}

    def describe(self) -> dict[str, Any]:
        """GET /models: the model, every configured variant (its state; passes and weight bytes once built),
        classes, defaults and limits. NotAccepting (503) until the checkpoint is read, and once draining."""
        if self.model is None or self.limits is None or self.phase in (Phase.DRAINING, Phase.STOPPED):
            refusal = self.lifecycle.refusal()
            raise self._while_loading(refusal) if refusal is not None else NotReady("loading", LOADING_RETRY_AFTER_S)
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
            "variants": [_variant(name, status, m.variants.get(name)) for name, status in self.variants.items()],
            "shared_weight_bytes": m.shared_bytes,
            "defaults": dataclasses.asdict(lim.defaults),
            "limits": limits,
        }

    def drain(self) -> asyncio.Task[None]:
        """Stop accepting and let accepted work finish within drain_grace_s (idempotent). Variants still
        starting stop at their next step: nobody would use them."""
        if self._drained is None:
            self.lifecycle.drain()  # at once: a load in progress sees it at its next stage
            self.metrics.ready.set(0)
            self._stop_starting()
            self._drained = asyncio.get_running_loop().create_task(self._drain(), name="var-drain")
        return self._drained

    def _stop_starting(self) -> None:
        for status in self.variants.values():
            if status.progress is not None:
                status.progress.cancel()

    async def _drain(self) -> None:
        if self.engine is not None:
            failed = await self.engine.drain(self.settings.drain_grace_s)
            log.info("drained; %d request(s) were not finished within the grace period", failed)

    async def stop(self) -> None:
        self._stop_starting()
        if self._loading and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        await self.drain()
        if self.engine is not None:
            await self.engine.stop()


def _fidelity_rate(s: ServeSettings) -> float:
    """The share of requests scored: 0 when the reference is not served (nothing to score against)."""
    if s.fidelity_rate and s.fidelity_reference not in s.variants:
        log.info("shadow fidelity off: its reference %s is not among the variants", s.fidelity_reference)
        return 0.0
    return s.fidelity_rate


def _serves(status: VariantStatus) -> float:
    return float(status.state is VariantState.READY)


def _variant(name: str, status: VariantStatus, v: ServedVariant | None) -> dict[str, Any]:
    """A variant in GET /models: its state (what it does, its progress, its error); what it is for and its
    passes; once built, its memory and where its window and sharing plans came from (null before)."""
    spec = variant_spec(name)
    built = {
        "weight_bytes": v.weight_bytes if v else None,
        "shares_vqvae": v.shares_vqvae if v else None,
        "window_plan": v.window_plan if v else None,
        "sharing_plan": v.sharing_plan if v else None,
    }
    return {"name": name, **status.as_dict(), "purpose": spec.purpose, "passes": spec.describe(), **built}
