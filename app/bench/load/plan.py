"""What the load test sends and when: the offered-load profile, the arrival times and the request mix."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"


KINDS = ("good", "short", "invalid", "cancel")


# An invalid body that is a JSON object may get 429 while the queue has no free row: the server refuses then
# before it validates (docs/serving.md#overload).
EXPECTED = {"good": {200, 429, 504}, "short": {200, 429, 504}, "cancel": {200, 429, 504}, "invalid": {422, 429}}


RETRY_AFTER = {429, 503}


CLOCK_TOLERANCE_S = 0.001  # a 504 earlier than timeout_s by more than this came before its deadline


@dataclass(frozen=True)
class Segment:
    """A stretch of the profile: the offered requests per second go linearly from start to end level
    (multiples of the capacity) over `seconds`."""

    name: str
    seconds: float
    start_level: float
    end_level: float


def ramp_profile(duration_s: float, peak: float) -> list[Segment]:
    """Idle to 1x, 1x to peak, peak held, back to 1x and to idle: 15, 20, 30, 20 and 15% of the time."""
    shares = [("warm", 0.15, 0.0, 1.0), ("ramp-up", 0.2, 1.0, peak), ("overload", 0.3, peak, peak)]
    shares += [("ramp-down", 0.2, peak, 1.0), ("cool", 0.15, 1.0, 0.0)]
    return [Segment(name, share * duration_s, a, b) for name, share, a, b in shares]


def steady_profile(duration_s: float, level: float) -> list[Segment]:
    return [Segment("steady", duration_s, level, level)]


def arrival_times(
    profile: Sequence[Segment], capacity: float, rng: random.Random, poisson: bool, limit: int
) -> list[float]:
    """Arrival times (seconds from the start) whose rate follows the profile: the points where the integral of
    the rate reaches the sums of unit steps (exponential ones: a Poisson process; steps of 1: evenly
    spaced). At most `limit` of them."""
    times: list[float] = []
    offset, mass_due = 0.0, (rng.expovariate(1.0) if poisson else 0.5)
    for seg in profile:
        rate0 = capacity * seg.start_level
        slope_half = capacity * (seg.end_level - seg.start_level) / (2 * seg.seconds) if seg.seconds > 0 else 0.0
        mass = rate0 * seg.seconds + slope_half * seg.seconds**2  # arrivals expected in this segment
        while mass_due <= mass and len(times) < limit:
            # solve rate0 t + slope_half t^2 = mass_due for t (the form without cancellation)
            root = rate0 + math.sqrt(max(rate0 * rate0 + 4 * slope_half * mass_due, 0.0))
            t = 2 * mass_due / root if root > 0 else 0.0
            times.append(offset + min(t, seg.seconds))
            mass_due += rng.expovariate(1.0) if poisson else 1.0
        mass_due -= mass
        offset += seg.seconds
    return times


def phase_of(profile: Sequence[Segment], t: float) -> str:
    end = 0.0
    for seg in profile:
        end += seg.seconds
        if t < end:
            return seg.name
    return profile[-1].name


# ---- requests ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerLimits:
    variants: tuple[str, ...]
    num_classes: int
    top_k_max: int
    max_images_per_request: int
    max_timeout_s: float
    max_batch_size: int
    queue_capacity: int

    @classmethod
    def from_models(cls, info: dict[str, Any]) -> ServerLimits:
        lim = info["limits"]
        return cls(
            variants=tuple(v["name"] for v in info["variants"]),
            num_classes=len(info["classes"]),
            top_k_max=int(lim["top_k_max"]),
            max_images_per_request=int(lim["max_images_per_request"]),
            max_timeout_s=float(lim["max_timeout_s"]),
            max_batch_size=int(lim["max_batch_size"]),
            queue_capacity=int(lim["queue_capacity"]),
        )


def invalid_body(i: int, variant: str, lim: ServerLimits, timeout_s: float) -> dict[str, Any]:
    """The i-th of ten bodies, each with one invalid field (the server answers 422, or 429 while full)."""
    good: dict[str, Any] = {"class_label": 1, "variant": variant, "timeout_s": timeout_s}
    bad: list[dict[str, Any]] = [
        {"class_label": lim.num_classes},  # out of range
        {"num_images": 0},
        {"num_images": lim.max_images_per_request + 1},
        {"variant": "no-such-variant"},
        {"class_label": "1"},  # strict: a string is not an integer
        {"top_k": lim.top_k_max + 1},
        {"timeout_s": 2 * lim.max_timeout_s},
        {"cfg": -1.0},
        {"unknown_field": 1},
        {"class_label": None},  # neither class_label nor class_name
    ]
    return good | bad[i % len(bad)]


@dataclass(frozen=True)
class Planned:
    index: int
    at_s: float  # arrival, seconds from the start of the schedule
    kind: str
    variant: str
    phase: str
    body: dict[str, Any]
    timeout_s: float
    cancel_after_s: float | None = None


@dataclass(frozen=True)
class Mix:
    shares: dict[str, float]  # kind -> share of the arrivals
    timeout_s: float
    short_timeout_s: float
    cancel_after_s: tuple[float, float]  # the client gives up after a delay drawn uniformly from this range


def plan_requests(
    times: Sequence[float], profile: Sequence[Segment], variants: Sequence[str], lim: ServerLimits, mix: Mix,
    rng: random.Random,
) -> list[Planned]:  # fmt: skip
    kinds = list(mix.shares)
    weights = [mix.shares[k] for k in kinds]
    plan = []
    for i, at in enumerate(times):
        kind = rng.choices(kinds, weights)[0]
        variant = rng.choice(list(variants))
        timeout_s = mix.short_timeout_s if kind == "short" else mix.timeout_s
        label = rng.randrange(lim.num_classes)
        if kind == "invalid":
            body = invalid_body(rng.randrange(10), variant, lim, timeout_s)
        else:
            body = {"class_label": label, "seed": 1_000_000 + i, "variant": variant, "timeout_s": timeout_s}
        cancel = rng.uniform(*mix.cancel_after_s) if kind == "cancel" else None
        plan.append(Planned(i, at, kind, variant, phase_of(profile, at), body, timeout_s, cancel))
    return plan
