"""Passes and variants as data: a `PassSpec` names a pass function and its typed options, a `Step` is a pass
with chosen options, a `VariantSpec` is a purpose plus its steps in order.

A pass function stays a plain function pipeline -> pipeline with keyword options (callers and tests call it
directly); its options dataclass has one field per keyword option the variants may set, with the same default,
checked against the function's signature when the spec is made: a renamed option or a changed default fails
at import, not at load. A pass that takes a plan calibrated for the checkpoint's weights says which
(`PassSpec.plan`): it gets it as its `plan` argument, never from a file (plans.py finds and loads plans).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from app.model.pipeline import VARPipeline

PassFn = Callable[..., VARPipeline]
DeviceTest = Callable[[torch.device], bool]


def nowhere(device: torch.device) -> bool:
    return False


def every_device(device: torch.device) -> bool:
    return True


def cuda_only(device: torch.device) -> bool:
    return device.type == "cuda"


class PlanKind(StrEnum):
    """A plan calibrated for a checkpoint's weights that a pass takes as its `plan` argument."""

    WINDOWS = "window"
    SHARING = "sharing"


@dataclass(frozen=True)
class PassSpec:
    name: str  # the function's name: what /models, the metrics and the logs call the pass
    function: PassFn
    options_type: type[Any] | None  # a dataclass of the function's keyword options; None: it takes none
    summary: str  # one line
    plan: PlanKind | None = None  # the checkpoint's plan the function takes as `plan`; None: it takes none
    # whether the pass puts code under torch.compile on a device (by its type, or by the hardware table), so that
    # a first call at a new batch shape compiles graphs (seconds to minutes) instead of computing at once
    compiles_on: DeviceTest = nowhere

    def __post_init__(self) -> None:
        keywords = {
            p.name: p.default for p in inspect.signature(self.function).parameters.values() if p.kind is p.KEYWORD_ONLY
        }
        if self.plan is not None and "plan" not in keywords:
            raise TypeError(f"{self.name} takes a {self.plan} plan but has no keyword argument `plan`")
        if self.options_type is None:
            return
        defaults = _as_kwargs(self.options_type())
        differ = [k for k, v in defaults.items() if k not in keywords or keywords[k] != v]
        if differ:
            raise TypeError(
                f"{self.options_type.__name__} fields {differ} are not keyword options of {self.name} "
                "with the same defaults"
            )

    def describe(self, options: object | None) -> dict[str, Any]:
        return {"name": self.name, "options": _as_dict(options), "summary": self.summary}


@dataclass(frozen=True)
class Step:
    """One pass of a variant with its options (the options type's defaults when none are given)."""

    spec: PassSpec
    options: object | None = None

    def __post_init__(self) -> None:
        wanted = self.spec.options_type
        if wanted is None and self.options is not None:
            raise TypeError(f"{self.spec.name} takes no options, got {self.options!r}")
        if wanted is not None and self.options is None:
            object.__setattr__(self, "options", wanted())
        elif wanted is not None and not isinstance(self.options, wanted):
            raise TypeError(f"{self.spec.name} takes {wanted.__name__} options, got {self.options!r}")

    def run(self, pipe: VARPipeline, **inputs: Any) -> VARPipeline:
        """The pass on `pipe` with these options; `inputs` are keyword arguments that come from the checkpoint
        rather than from the variant (its plan)."""
        return self.spec.function(pipe, **_as_kwargs(self.options), **inputs)


@dataclass(frozen=True)
class VariantSpec:
    purpose: str  # one line: what the variant is for
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def uses(self, spec: PassSpec) -> bool:
        return any(step.spec is spec for step in self.steps)

    def compiled(self, device: torch.device) -> bool:
        """Whether a pass compiles on this device (`PassSpec.compiles_on`): the service then warms the variant at
        each batch size that needs graphs of its own, and an eager one once."""
        return any(step.spec.compiles_on(device) for step in self.steps)

    def plans(self) -> frozenset[PlanKind]:
        """The checkpoint's plans its passes take."""
        return frozenset(step.spec.plan for step in self.steps if step.spec.plan is not None)

    def describe(self) -> list[dict[str, Any]]:
        """Each pass in order: its name, options as a dict, summary."""
        return [step.spec.describe(step.options) for step in self.steps]


def _as_kwargs(options: object | None) -> dict[str, Any]:
    """The options' fields as keyword arguments, values as they are (not recursively copied as `asdict` would)."""
    if options is None:
        return {}
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}  # type: ignore[arg-type]


def _as_dict(options: object | None) -> dict[str, Any]:
    """The options as plain JSON-ready values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _as_kwargs(options).items()}
