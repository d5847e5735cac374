"""From a loaded checkpoint to every configured variant serving: one variant at a time, the default first,
while the variants already started serve.

Each variant (its state: `VariantStatus`, app/serve/engine/variants.py) goes through:
1. its plans: those saved beside the checkpoint, or, missing, calibrated on the unmodified model (one run for
   every plan still missing, which every variant that takes it then shares) and saved beside the checkpoint
   where the folder is writable (else a warning: the next start calibrates again); with
   calibrate_missing_plans off the variant fails instead, naming the command that saves them;
2. its passes, applied to a copy of the checkpoint;
3. its warm-up (warmup.py): eager variants one call at batch 1, compiled ones each size that needs graphs;
4. `serve`: the service starts the engine with it (the default variant) or adds it to the running engine.

Steps 1 to 3 run in threads of their own, not the engine's worker, so that the variants already serving keep
their cores' share. Calibration and warm-up log where they are every 10 s and show it in /models and /readyz.

A variant that fails at any step is reported failed, with its error, and the next one starts. The default
variant failing fails the load: requests that name no variant could never be served. Order: the default
first (the service is ready once it serves), then the variants whose plans are there, then the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from app.compress import variant_spec
from app.compress.compile_cache import load_compiled, save_compiled
from app.compress.plans import (
    CALIBRATE,
    DEFAULT_CALIBRATION,
    MissingSharingPlan,
    MissingWindowPlan,
    Plans,
    calibrated,
    save_plans,
    saved_plans,
)
from app.compress.registry import PlanKind
from app.model.pipeline import VARPipeline
from app.model.progress import Cancelled, Progress, heartbeat
from app.serve.engine import VariantState, VariantStatus, fail_unsettled
from app.serve.engine.threads import in_own_thread
from app.serve.metrics import ServeMetrics
from app.serve.models import ServedModel, ServedVariant, build_variant
from app.serve.warmup import warm_up, warmup_batch_sizes

log = logging.getLogger(__name__)
CALIBRATION = DEFAULT_CALIBRATION  # what missing plans are calibrated with (tests take a cheaper one)


@dataclass(frozen=True)
class StartupSettings:
    """The service settings that shape the startup (ServeSettings fields of the same names)."""

    variants: tuple[str, ...]
    default_variant: str
    calibrate_missing_plans: bool
    warmup: bool
    max_batch_size: int
    compile_cache: Path | None = None


class Startup:
    def __init__(
        self,
        model: ServedModel,
        settings: StartupSettings,
        statuses: Mapping[str, VariantStatus],
        metrics: ServeMetrics,
        serve: Callable[[ServedVariant], Awaitable[None]],
        running: Callable[[], bool],
    ):
        self.model, self.settings, self.statuses, self.metrics = model, settings, statuses, metrics
        self.serve = serve  # hands a started variant to the service
        self.running = running  # False once the service is shutting down: nothing more starts
        self.specs = {name: variant_spec(name) for name in settings.variants}
        self.plans = Plans()
        self.plan_errors: dict[PlanKind, Exception] = {}  # a plan that could not be read or calibrated
        self.compiled: list[str] = []  # the variants warmed up with compiled code
        self._read_saved_plans()

    async def run(self) -> None:
        """Every variant in turn, then the base pipeline released. Raises what failed the default variant;
        returns early when shutting down."""
        try:
            await self._run()
        finally:
            self.model.release_base()

    async def _run(self) -> None:
        order = self.order()
        for name in order:
            self.statuses[name].move(VariantState.LOADING, "queued: variants start one at a time, the default first")
        for name in order:
            status = self.statuses[name]
            try:
                if not self.running():
                    raise Cancelled("shutting down")
                await self._start(name, status)
            except Cancelled:  # those not started will not serve
                fail_unsettled(self.statuses.values(), "not started: the service is shutting down")
                return
            except Exception as error:
                status.fail(f"{type(error).__name__}: {error}")
                if name == self.settings.default_variant:
                    raise
                # a missing plan says all there is to say; anything else gets its traceback
                trace = None if isinstance(error, MissingWindowPlan | MissingSharingPlan) else error
                log.error("variant %s failed to start (the others serve): %s", name, status.error, exc_info=trace)
        self._log_outcome()
        await self._save_compiled()

    def order(self) -> list[str]:
        """The default variant, then those whose plans are there, then those whose plans must be calibrated."""
        rest = [n for n in self.settings.variants if n != self.settings.default_variant]
        waiting = [n for n in rest if self.specs[n].plans() - self.plans.kinds()]
        return [self.settings.default_variant, *(n for n in rest if n not in waiting), *waiting]

    async def _start(self, name: str, status: VariantStatus) -> None:
        t0 = time.monotonic()
        plans = await self._plans_for(name, status)
        status.move(VariantState.LOADING, "applying its passes")
        alone = len(self.specs) == 1  # then the checkpoint's own pipeline becomes the variant
        variant = await in_own_thread(build_variant, self.model, name, plans, alone=alone)
        if self.settings.warmup:
            await self._warm_up(variant, status)
        if not self.running():
            raise Cancelled("shutting down")
        await self.serve(variant)
        status.move(VariantState.READY, "serving")
        log.info("variant %s ready in %.1f s", name, time.monotonic() - t0)

    # ---- plans -----------------------------------------------------------------------------------
    def _read_saved_plans(self) -> None:
        """The plans saved beside the checkpoint, each kind on its own: one that cannot be read (or is for
        another model shape) fails the variants that take it, not the others."""
        needed: frozenset[PlanKind] = frozenset().union(*(spec.plans() for spec in self.specs.values()))
        for kind in needed:
            try:
                self.plans = self.plans.merged(saved_plans(self.model.folder, {kind}, self.model.config.var))
            except (OSError, ValueError) as error:
                self.plan_errors[kind] = error

    async def _plans_for(self, name: str, status: VariantStatus) -> Plans:
        needed = self.specs[name].plans()
        for kind in needed & self.plan_errors.keys():
            raise self.plan_errors[kind]
        missing = needed - self.plans.kinds()
        if missing and not self.settings.calibrate_missing_plans:
            folder = self.model.folder
            raise MissingWindowPlan(folder) if PlanKind.WINDOWS in missing else MissingSharingPlan(folder)
        if missing:
            await self._calibrate(name, status)
        return self.plans

    async def _calibrate(self, name: str, status: VariantStatus) -> None:
        """Every plan still missing for a variant not yet started, from one run on the unmodified model."""
        wanted = frozenset().union(*(self.specs[n].plans() for n, s in self.statuses.items() if not s.settled))
        kinds = wanted - self.plans.kinds() - self.plan_errors.keys()
        what = plan_words(kinds)
        log.warning(
            "no %s beside %s: calibrating for %s on the unmodified model (`%s` saves them ahead)",
            what, self.model.folder, name, CALIBRATE,
        )  # fmt: skip
        progress = Progress(f"{name}: calibrating its {what}")
        status.move(VariantState.CALIBRATING, f"calibrating its {what}", progress)
        try:
            with heartbeat(progress, log.info):
                plans = await in_own_thread(calibrated, self._base(), kinds, CALIBRATION, progress)
        except Exception as error:
            if not isinstance(error, Cancelled):
                self.plan_errors |= dict.fromkeys(kinds, error)  # the other variants that take them fail alike
            raise
        log.info("calibrated the %s in %.1f s", what, progress.elapsed_s)
        self.plans = self.plans.merged(plans)
        status.move(VariantState.LOADING, f"saving its {what} beside the checkpoint")
        await in_own_thread(self._save, plans)

    def _base(self) -> VARPipeline:
        assert self.model.base is not None, "released only once every variant has started"
        return self.model.base

    def _save(self, plans: Plans) -> None:
        folder = self.model.folder
        try:
            written = save_plans(plans, folder)
        except OSError as error:
            log.warning(
                "could not save the calibrated plans beside %s (%s): the next start calibrates them again; "
                "`%s --model %s` saves them where the folder is writable",
                folder, error, CALIBRATE, folder,
            )  # fmt: skip
            return
        log.info("saved %s beside the checkpoint: the next start reads them", ", ".join(p.name for p in written))

    # ---- warm-up ---------------------------------------------------------------------------------
    async def _warm_up(self, variant: ServedVariant, status: VariantStatus) -> None:
        m = self.model
        sizes = warmup_batch_sizes(variant.spec, m.device, self.settings.max_batch_size, variant.pipeline.steps)
        compiled = variant.spec.compiled(m.device)
        if compiled and not self.compiled:
            await self._load_compiled()
        compiling = "compiling and " if compiled else ""
        progress = Progress(f"{variant.name}: {compiling}warming up at batch sizes {sizes}")
        status.move(VariantState.WARMING, f"{compiling}warming up (batch sizes {sizes})", progress)
        log.info("%s", progress.task)
        with heartbeat(progress, log.info):
            outputs = await in_own_thread(warm_up, variant.pipeline, sizes, m.defaults, progress)
        for out in outputs:  # the memory of the warmed batch sizes is known before the first request
            self.metrics.record_memory(variant.name, out.kv_cache_bytes, out.peak_bytes)
        log.info("warmed up %s at batch sizes %s in %.1f s", variant.name, sizes, progress.elapsed_s)
        if compiled:
            self.compiled.append(variant.name)

    # ---- compiled code shipped as a file (compile_cache.py) ----------------------------------------
    async def _load_compiled(self) -> None:
        """Before the first compiled warm-up: the compile cache file, when there is one. One that cannot be
        read is logged and compiled around: it only ever saves time."""
        path = self.settings.compile_cache
        if path is None:
            return
        try:
            if not await in_own_thread(load_compiled, path):
                log.info("no compile cache at %s: compiling, then saving it there", path)
        except Exception:
            log.warning("compile cache %s could not be loaded; compiling without it", path, exc_info=True)

    async def _save_compiled(self) -> None:
        """After every variant started: the compile cache file, when a variant compiled and there is none yet."""
        path = self.settings.compile_cache
        if path is None or not self.compiled or path.exists():
            return
        try:
            await in_own_thread(save_compiled, path)
        except OSError as e:
            log.warning("compile cache not saved to %s (%s): the next start compiles again", path, e)

    def _log_outcome(self) -> None:
        failed = {n: s.error for n, s in self.statuses.items() if s.state is VariantState.FAILED}
        ready = [n for n, s in self.statuses.items() if s.state is VariantState.READY]
        log.info("variants started: %s ready%s", ", ".join(ready) or "none", f", failed: {failed}" if failed else "")


def plan_words(kinds: frozenset[PlanKind]) -> str:
    """e.g. "window and sharing plans", "sharing plan"."""
    return " and ".join(kind.value for kind in PlanKind if kind in kinds) + (" plans" if len(kinds) > 1 else " plan")
