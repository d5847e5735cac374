"""`python -m app.bench load`: open-loop load on loopback; every request answered, none late, no 5xx.

The tool starts the server (`start_server`, VAR_VARIANTS from `--variants`) or targets `--url` (127.0.0.1
only). It measures the capacity in images per second with a short closed-loop burst (or takes
`--capacity`), then sends requests at precomputed arrival times, whatever the answers: the offered load
follows a profile in multiples of that capacity. `ramp` (`make loadtest`): from idle to 1x, up to `--peak`
(4x), held, down to 1x and to idle. `steady` (`make soak`): `--level` (1x) throughout, with the RSS check.

Each arrival is one of four kinds, drawn with a seed:
- good: one image of a variant, timeout_s `--timeout-s`; answered 200, or 429 (queue full) or 504 (deadline);
- short: the same with timeout_s `--short-timeout-s`, so that deadlines pass under overload;
- invalid: a body with an invalid field; answered 422;
- cancel: a good request the client gives up on after a random delay, closing its connection.

Per request: its status, or that the tool cancelled it on purpose; otherwise it got no answer
(`unanswered`). An answer later than its timeout_s plus `--allowance-s` is `late`; a 5xx other than a 504
that came after timeout_s is an `unexpected_5xx`; an answer of a status not expected for its kind, a 429 or
503 without Retry-After or a 200 of the wrong variant or image count is a `wrong_answer`. The server's RSS is
sampled throughout (/proc/<pid>/status of the started server, else its process_resident_memory_bytes).
Exit status 1 when any of those counts is not 0 or the RSS grew more than `--max-rss-growth`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.bench.served import start_server, wait_ready

LOOPBACK = "127.0.0.1"
KINDS = ("good", "short", "invalid", "cancel")
EXPECTED = {"good": {200, 429, 504}, "short": {200, 429, 504}, "cancel": {200, 429, 504}, "invalid": {422}}
RETRY_AFTER = {429, 503}
CLOCK_TOLERANCE_S = 0.001  # a 504 earlier than timeout_s by more than this came before its deadline
MAX_RSS_SAMPLES = 100_000


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
    """The i-th of ten bodies, each with one invalid field (the server answers 422)."""
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


@dataclass
class Outcome:
    index: int
    kind: str
    variant: str
    phase: str
    at_s: float
    timeout_s: float
    lag_s: float = 0.0  # sent this much later than scheduled
    status: int | None = None
    latency_s: float | None = None  # from sending to the whole answer read
    done_s: float | None = None  # when the answer was read, from the start of the schedule
    images: int = 0
    answer_variant: str | None = None
    retry_after: str | None = None
    cancelled: bool = False  # the tool gave up on purpose (kind "cancel") before an answer came
    error: str | None = None


def problems(o: Outcome, allowance_s: float) -> set[str]:
    """What is wrong with one request's outcome: unanswered, late, unexpected_5xx, wrong_answer."""
    if o.status is None:
        return set() if o.cancelled else {"unanswered"}
    found = set()
    assert o.latency_s is not None
    if o.latency_s > o.timeout_s + allowance_s:
        found.add("late")
    if o.status >= 500 and not (o.status == 504 and o.latency_s >= o.timeout_s - CLOCK_TOLERANCE_S):
        found.add("unexpected_5xx")
    elif o.status not in EXPECTED[o.kind]:
        found.add("wrong_answer")
    if o.status in RETRY_AFTER and not o.retry_after:
        found.add("wrong_answer")
    if o.status == 200 and (o.images != 1 or o.answer_variant != o.variant):
        found.add("wrong_answer")
    return found


async def send(client: httpx.AsyncClient, p: Planned, o: Outcome, t0: float, hard_s: float) -> None:
    """Send one planned request and fill in its outcome; never raises (except when cancelled itself)."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    give_up = p.cancel_after_s if p.cancel_after_s is not None and p.cancel_after_s < hard_s else hard_s
    try:
        async with asyncio.timeout(give_up):
            r = await client.post("/generate", json=p.body)
    except TimeoutError:
        if give_up < hard_s:
            o.cancelled = True
        else:
            o.error = f"no answer within {hard_s:g} s"
        return
    except Exception as e:  # a transport error: the request got no answer
        o.error = f"{type(e).__name__}: {e}"
        return
    now = loop.time()
    o.status, o.latency_s, o.done_s = r.status_code, now - sent, now - t0
    o.retry_after = r.headers.get("retry-after")
    if r.status_code == 200:
        try:
            answer = r.json()
            o.images, o.answer_variant = len(answer["images"]), answer["variant"]
        except (ValueError, KeyError, TypeError) as e:
            o.error = f"unreadable 200 answer: {e}"


class ConnectionPerRequest(httpx.AsyncBaseTransport):
    """Each request on a connection of its own (httpx's own httpcore, without its pool), opened when it is
    sent and closed once its answer is read or when it is given up: every arrival is a client of its own, as
    in an open-loop test it should be, and the cost per request stays flat however many are in flight
    (httpcore's pool scans all its connections, some scans nested, for every request)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = httpcore.Origin(url.raw_scheme, url.raw_host, url.port or 80)
        target = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
        req = httpcore.Request(request.method, target, headers=request.headers.raw, content=request.content)
        async with httpcore.AsyncHTTPConnection(origin) as connection:
            answer = await connection.handle_async_request(req)
            content = await answer.aread()
        return httpx.Response(answer.status, headers=answer.headers, content=content)


# ---- the server's side ---------------------------------------------------------------------------
def metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, s.value


async def rejections(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {lab["reason"]: v for name, lab, v in metric_samples(text) if name == "var_rejections_total"}


async def server_info(client: httpx.AsyncClient) -> dict[str, str]:
    text = (await client.get("/metrics")).text
    for name, labels, _ in metric_samples(text):
        if name == "var_model_info":
            return dict(labels)
    return {}


def proc_rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def process_metric(client: httpx.AsyncClient, name: str) -> float | None:
    """A metric of the process collector (process_resident_memory_bytes, process_cpu_seconds_total)."""
    try:
        text = (await client.get("/metrics")).text
    except Exception:
        return None
    return next((value for sample, _, value in metric_samples(text) if sample == name), None)


def proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


async def server_cpu_seconds(client: httpx.AsyncClient, pid: int | None) -> float | None:
    return proc_cpu_seconds(pid) if pid else await process_metric(client, "process_cpu_seconds_total")


@dataclass
class RssSampler:
    pid: int | None
    interval_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"/proc/{self.pid}/status VmRSS" if self.pid else "process_resident_memory_bytes"

    async def run(self, client: httpx.AsyncClient, t0: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(MAX_RSS_SAMPLES):
            rss = (
                proc_rss_bytes(self.pid) if self.pid else await process_metric(client, "process_resident_memory_bytes")
            )
            if rss is not None:
                self.samples.append((round(loop.time() - t0, 3), int(rss)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
            if stop.is_set():
                return


def rss_growth(samples: Sequence[tuple[float, int]], warmup_s: float, window_s: float, end_s: float) -> dict[str, Any]:
    """The median RSS of the first window after the warm-up against that of the last window of the run (growth
    None when the run is too short for two windows after the warm-up, or samples are missing)."""
    first = [b for t, b in samples if warmup_s <= t < warmup_s + window_s]
    last = [b for t, b in samples if end_s - window_s <= t <= end_s]
    out: dict[str, Any] = {
        "first_window_s": [warmup_s, warmup_s + window_s],
        "last_window_s": [end_s - window_s, end_s],
    }
    if not first or not last or end_s - window_s < warmup_s + window_s:
        return out | {"first_median_bytes": None, "last_median_bytes": None, "growth": None}
    a, b = statistics.median(first), statistics.median(last)
    return out | {"first_median_bytes": a, "last_median_bytes": b, "growth": b / a - 1}


# ---- capacity and the run ------------------------------------------------------------------------
async def measure_capacity(
    client: httpx.AsyncClient, variants: Sequence[str], lim: ServerLimits, n: int, limit_s: float
) -> float:
    """Images per second of one-image requests, closed loop: enough clients to fill a batch of every variant
    (never more than the queue holds), after one untimed round."""
    concurrency = max(1, min(lim.queue_capacity, lim.max_batch_size * len(variants)))

    async def burst(first: int, count: int) -> None:
        seeds = iter(range(first, first + count))

        async def worker() -> None:
            for seed in seeds:
                body = {"class_label": seed % lim.num_classes, "seed": seed, "variant": variants[seed % len(variants)]}
                r = await client.post("/generate", json=body | {"timeout_s": min(limit_s, lim.max_timeout_s)})
                if r.status_code != 200:
                    raise RuntimeError(f"capacity burst: answer {r.status_code}: {r.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async with asyncio.timeout(limit_s):
        await burst(0, concurrency)
        t0 = time.perf_counter()
        await burst(concurrency, n)
        return n / (time.perf_counter() - t0)


@dataclass
class RunResult:
    outcomes: list[Outcome]
    rss: RssSampler
    rejections: dict[str, float]
    lag_s: list[float]
    max_inflight: int
    span_s: float
    client_cpu_s: float  # this process: is the load generator keeping up?
    server_cpu_s: float | None


async def run_schedule(
    client: httpx.AsyncClient, plan: Sequence[Planned], rss: RssSampler, pid: int | None, hard_s: float, tail_s: float
) -> RunResult:
    """Send every planned request at its time (whatever the answers), then wait at most tail_s for the last
    answers; what is still open then got no answer."""
    loop = asyncio.get_running_loop()
    before = await rejections(client)
    cpu0, server_cpu0 = time.process_time(), await server_cpu_seconds(client, pid)
    outcomes = [Outcome(p.index, p.kind, p.variant, p.phase, p.at_s, p.timeout_s) for p in plan]
    inflight = max_inflight = 0

    async def tracked(p: Planned, o: Outcome) -> None:
        nonlocal inflight, max_inflight
        inflight += 1
        max_inflight = max(max_inflight, inflight)
        try:
            await send(client, p, o, t0, hard_s)
        finally:
            inflight -= 1

    stop = asyncio.Event()
    t0 = loop.time()
    sampler = asyncio.create_task(rss.run(client, t0, stop))
    tasks = []
    for p, o in zip(plan, outcomes, strict=True):
        if (delay := t0 + p.at_s - loop.time()) > 0:
            await asyncio.sleep(delay)
        o.lag_s = loop.time() - (t0 + p.at_s)
        tasks.append(asyncio.create_task(tracked(p, o)))
    if tasks:
        _, still_open = await asyncio.wait(tasks, timeout=tail_s)
        for t in still_open:
            t.cancel()
        await asyncio.gather(*still_open, return_exceptions=True)
    for o in outcomes:
        if o.status is None and not o.cancelled and o.error is None:
            o.error = f"still open {tail_s:g} s after the last arrival"
    span, cpu = loop.time() - t0, time.process_time() - cpu0
    server_cpu1 = await server_cpu_seconds(client, pid)
    server_cpu = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    stop.set()
    await sampler
    after = await rejections(client)
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return RunResult(outcomes, rss, diff, [o.lag_s for o in outcomes], max_inflight, span, cpu, server_cpu)


# ---- the report ----------------------------------------------------------------------------------
def percentile_ms(values: Sequence[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return 1000 * values[0]
    return 1000 * statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def status_key(o: Outcome) -> str:
    if o.status is not None:
        return str(o.status)
    return "cancelled" if o.cancelled else "unanswered"


def summarize(
    res: RunResult, profile: Sequence[Segment], variants: Sequence[str], allowance_s: float
) -> dict[str, Any]:
    outs = res.outcomes
    flagged = Counter(p for o in outs for p in problems(o, allowance_s))
    ok = [o for o in outs if o.status == 200]
    span = max(res.span_s, sum(s.seconds for s in profile))  # from the first arrival to the last answer
    totals = {
        "requests": len(outs),
        "answered": sum(o.status is not None for o in outs),
        "cancelled": sum(o.cancelled for o in outs),
        "unanswered": flagged["unanswered"],
        "late": flagged["late"],
        "unexpected_5xx": flagged["unexpected_5xx"],
        "wrong_answers": flagged["wrong_answer"],
        "by_status": dict(sorted(Counter(status_key(o) for o in outs).items())),
        "by_kind": {k: dict(sorted(Counter(status_key(o) for o in outs if o.kind == k).items())) for k in KINDS},
        "images": sum(o.images for o in ok),
        "images_per_second": sum(o.images for o in ok) / span,
        "answers_per_second": sum(o.status is not None for o in outs) / span,
        "duration_s": span,
        "schedule_lag_p99_ms": percentile_ms(res.lag_s, 99),
        "schedule_lag_max_ms": 1000 * max(res.lag_s, default=0.0),
        "max_inflight": res.max_inflight,
        "client_cpu_s": res.client_cpu_s,
        "server_cpu_s": res.server_cpu_s,
        "refusal_p99_ms": percentile_ms([o.latency_s for o in outs if o.status in (422, 429) and o.latency_s], 99),
    }
    per_variant = {}
    for v in variants:
        mine = [o for o in ok if o.variant == v]
        lat = [o.latency_s for o in mine if o.latency_s is not None]
        per_variant[v] = {
            "requests": sum(o.variant == v and o.kind != "invalid" for o in outs),
            "ok": len(mine),
            "images": sum(o.images for o in mine),
            "p50_ms": percentile_ms(lat, 50),
            "p95_ms": percentile_ms(lat, 95),
            "p99_ms": percentile_ms(lat, 99),
            "images_per_second": sum(o.images for o in mine) / span,
        }
    phases, start = [], 0.0
    for seg in profile:
        end = start + seg.seconds
        mine = [o for o in outs if o.phase == seg.name]
        done = [o for o in ok if o.done_s is not None and start <= o.done_s < end]
        lat = [o.latency_s for o in mine if o.status == 200 and o.latency_s is not None]
        phases.append(
            {
                "name": seg.name,
                "start_s": start,
                "end_s": end,
                "start_level": seg.start_level,
                "end_level": seg.end_level,
                "requests": len(mine),
                "offered_per_second": len(mine) / seg.seconds if seg.seconds else 0.0,
                "by_status": dict(sorted(Counter(status_key(o) for o in mine).items())),
                "images_per_second": sum(o.images for o in done) / seg.seconds if seg.seconds else 0.0,
                "p50_ms": percentile_ms(lat, 50),  # of the 200 answers to the requests sent in this phase
                "p99_ms": percentile_ms(lat, 99),
            }
        )
        start = end
    errors = Counter(o.error for o in outs if o.error)
    return {"totals": totals, "variants": per_variant, "phases": phases, "errors": dict(errors.most_common(10))}


def mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def print_report(report: dict[str, Any]) -> None:
    t = report["totals"]
    print(
        f"capacity {report['capacity_images_per_second']:.1f} images/s ({report['capacity_source']}); "
        f"profile {report['profile_name']}, {report['duration_s']:g} s; {report['date']}"
    )
    statuses = sorted({s for ph in report["phases"] for s in ph["by_status"]}, key=lambda s: (not s.isdigit(), s))
    head = f"{'phase':<10} {'level':>9} {'offered/s':>9} {'images/s':>8} {'p50':>8} {'p99':>8} "
    print(head + " ".join(f"{s:>10}" for s in statuses))
    for ph in report["phases"]:
        level = f"{ph['start_level']:g}-{ph['end_level']:g}x"
        counts = " ".join(f"{ph['by_status'].get(s, 0):>10}" for s in statuses)
        print(
            f"{ph['name']:<10} {level:>9} {ph['offered_per_second']:>9.1f} {ph['images_per_second']:>8.1f} "
            f"{ms(ph['p50_ms']):>8} {ms(ph['p99_ms']):>8} {counts}"
        )
    print(f"{'variant':<10} {'200s':>6} {'p50':>8} {'p95':>8} {'p99':>8} {'images/s':>9}")
    for name, v in report["variants"].items():
        print(
            f"{name:<10} {v['ok']:>6} {ms(v['p50_ms']):>8} {ms(v['p95_ms']):>8} {ms(v['p99_ms']):>8} "
            f"{v['images_per_second']:>9.1f}"
        )
    rej = ", ".join(f"{k} {v:g}" for k, v in sorted(report["rejections"].items()) if v)
    print(f"rejections (server /metrics, during the run): {rej or 'none'}")
    rss = report["rss"]
    line = f"server RSS ({rss['source']}): start {mib(rss['start_bytes'])}, peak {mib(rss['peak_bytes'])}, "
    line += f"end {mib(rss['end_bytes'])}"
    if (g := rss["growth"]["growth"]) is not None:
        line += f"; median of the last window {100 * g:+.1f}% over the first after warm-up"
    print(line)
    print(
        f"requests {t['requests']}: answered {t['answered']}, cancelled {t['cancelled']}, unanswered "
        f"{t['unanswered']}, late {t['late']}, unexpected 5xx {t['unexpected_5xx']}, wrong answers "
        f"{t['wrong_answers']}; {t['images_per_second']:.1f} images/s, schedule lag p99 "
        f"{ms(t['schedule_lag_p99_ms'])}, most in flight {t['max_inflight']}"
    )
    server_cpu = "-" if t["server_cpu_s"] is None else f"{t['server_cpu_s']:.0f} s"
    print(
        f"CPU during the run: this tool {t['client_cpu_s']:.0f} s, the server {server_cpu}, "
        f"over {t['duration_s']:.0f} s of wall time"
    )
    for failure in report["failures"]:
        print(f"FAILED: {failure}")


# ---- command line --------------------------------------------------------------------------------
def loopback_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname != LOOPBACK:
        raise SystemExit(f"--url must be http://{LOOPBACK}:<port>; this tool loads only the loopback address")
    return url.rstrip("/")


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("VAR_"):
        raise argparse.ArgumentTypeError(f"expected VAR_NAME=value, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench load", description=__doc__.splitlines()[0])
    ap.add_argument("--url", type=loopback_url, help=f"load this running server (http://{LOOPBACK}:PORT only)")
    ap.add_argument("--model-dir", type=Path, default=Path("model_store/demo"), help="of the started server")
    ap.add_argument("--variants", default="baseline,litevar", help="comma-separated; the requests spread over them")
    ap.add_argument("--torch-threads", type=int, default=1, help="of the started server; the tool takes a core too")
    ap.add_argument("--set", type=key_value, action="append", default=[], metavar="VAR_NAME=VALUE",
                    help="a further setting of the started server (repeatable)")  # fmt: skip
    ap.add_argument("--server-log", type=Path, help="where the started server's output goes")
    ap.add_argument("--profile", choices=("ramp", "steady"), default="ramp")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of the profile")
    ap.add_argument("--peak", type=float, default=4.0, help="ramp: highest offered load, times the capacity")
    ap.add_argument("--level", type=float, default=1.0, help="steady: offered load, times the capacity")
    ap.add_argument("--capacity", type=float, help="images per second; measured with a closed-loop burst if not given")
    ap.add_argument("--capacity-requests", type=int, default=64, help="timed requests of the capacity burst")
    ap.add_argument("--arrivals", choices=("poisson", "even"), default="poisson")
    ap.add_argument("--seed", type=int, default=0, help="of the arrival times and the request mix")
    ap.add_argument("--invalid-share", type=float, default=0.1)
    ap.add_argument("--cancel-share", type=float, default=0.1)
    ap.add_argument("--short-share", type=float, default=0.1, help="good requests with --short-timeout-s")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="timeout_s of the requests")
    ap.add_argument("--short-timeout-s", type=float, default=1.0)
    ap.add_argument("--cancel-after", default="0.02,1.0", help="MIN,MAX seconds before a cancel request gives up")
    ap.add_argument("--allowance-s", type=float, default=1.0, help="transport allowance past timeout_s")
    ap.add_argument("--grace-s", type=float, default=10.0, help="past timeout_s + allowance: then no answer")
    ap.add_argument("--max-requests", type=int, default=20_000, help="the schedule stops there")
    ap.add_argument("--rss-interval-s", type=float, default=1.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="RSS check: the first seconds left out")
    ap.add_argument("--rss-window-s", type=float, default=60.0, help="RSS check: medians over windows this long")
    ap.add_argument("--max-rss-growth", type=float, help="fail above this growth (0.05: 5%%); not checked if unset")
    ap.add_argument("--ready-limit-s", type=float, default=300.0, help="for the server to become ready")
    ap.add_argument("--json", type=Path, default=Path("runs/loadtest.json"))
    a = ap.parse_args(argv)
    a.variant_list = [v for v in a.variants.split(",") if v]
    lo, _, hi = a.cancel_after.partition(",")
    a.cancel_range = (float(lo), float(hi or lo))
    good = 1 - a.invalid_share - a.cancel_share - a.short_share
    if min(good, a.invalid_share, a.cancel_share, a.short_share) < 0:
        ap.error("--invalid-share, --cancel-share and --short-share must be >= 0 and sum to at most 1")
    a.shares = {"good": good, "short": a.short_share, "invalid": a.invalid_share, "cancel": a.cancel_share}
    if a.duration <= 0 or a.max_requests < 1 or not a.variant_list:
        ap.error("--duration must be > 0, --max-requests >= 1, --variants not empty")
    if a.max_rss_growth is not None and a.duration < a.warmup_s + 2 * a.rss_window_s:
        ap.error("--max-rss-growth needs --duration >= --warmup-s + 2 x --rss-window-s")
    return a


@contextlib.contextmanager
def target(a: argparse.Namespace) -> Iterator[tuple[str, int | None, Any]]:
    """(url, server pid or None, the started process or None)."""
    if a.url:
        wait_ready(a.url, limit_s=a.ready_limit_s)
        yield a.url, None, None
        return
    threads = str(a.torch_threads)
    env = {"VAR_MODEL_DIR": str(a.model_dir), "VAR_VARIANTS": ",".join(a.variant_list)}
    env |= {"VAR_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads} | dict(a.set)
    with start_server(env, a.server_log, ready_limit_s=a.ready_limit_s) as (url, proc):
        yield url, proc.pid, proc


def machine() -> dict[str, Any]:
    cpu, flags = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512": " avx512f" in flags, "load_average": os.getloadavg()}


async def load(a: argparse.Namespace, url: str, pid: int | None) -> dict[str, Any]:
    hard_s = a.timeout_s + a.allowance_s + a.grace_s
    transport = ConnectionPerRequest()
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=httpx.Timeout(hard_s + 5)) as client:
        lim = ServerLimits.from_models((await client.get("/models")).json())
        missing = [v for v in a.variant_list if v not in lim.variants]
        if missing:
            raise SystemExit(f"variants {missing} not loaded by the server (it has {list(lim.variants)})")
        info = await server_info(client)
        if a.capacity:
            capacity, source = a.capacity, "given"
        else:
            capacity = await measure_capacity(client, a.variant_list, lim, a.capacity_requests, limit_s=120)
            source = f"measured: {a.capacity_requests} one-image requests, closed loop"
        profile = ramp_profile(a.duration, a.peak) if a.profile == "ramp" else steady_profile(a.duration, a.level)
        rng = random.Random(a.seed)
        times = arrival_times(profile, capacity, rng, a.arrivals == "poisson", a.max_requests)
        mix = Mix(a.shares, a.timeout_s, a.short_timeout_s, a.cancel_range)
        plan = plan_requests(times, profile, a.variant_list, lim, mix, rng)
        print(f"capacity {capacity:.1f} images/s ({source}); sending {len(plan)} requests over {a.duration:g} s",
              file=sys.stderr, flush=True)  # fmt: skip
        res = await run_schedule(client, plan, RssSampler(pid, a.rss_interval_s), pid, hard_s, tail_s=hard_s + 1)
    report = summarize(res, profile, a.variant_list, a.allowance_s)
    rss = [b for _, b in res.rss.samples]
    end_s = sum(s.seconds for s in profile)
    return report | {
        "capacity_images_per_second": capacity,
        "capacity_source": source,
        "profile_name": a.profile,
        "profile": [asdict(s) for s in profile],
        "duration_s": a.duration,
        "truncated": len(times) >= a.max_requests,
        "server": {"url": url, "max_batch_size": lim.max_batch_size, "queue_capacity": lim.queue_capacity} | info,
        "rejections": res.rejections,
        "rss": {
            "source": res.rss.source,
            "start_bytes": rss[0] if rss else None,
            "peak_bytes": max(rss, default=None),
            "end_bytes": rss[-1] if rss else None,
            "growth": rss_growth(res.rss.samples, a.warmup_s, a.rss_window_s, end_s),
            "samples": res.rss.samples,
        },
    }


def failures(report: dict[str, Any], max_rss_growth: float | None, server_alive: bool) -> list[str]:
    t = report["totals"]
    found = [f"{k}: {t[k]}" for k in ("unanswered", "late", "unexpected_5xx", "wrong_answers") if t[k]]
    growth = report["rss"]["growth"]["growth"]
    if max_rss_growth is not None and (growth is None or growth > max_rss_growth):
        found.append(f"RSS growth {growth if growth is None else f'{100 * growth:+.1f}%'} (limit {max_rss_growth:.0%})")
    if not server_alive:
        found.append("the server exited during the run")
    return found


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    started, machine_before = datetime.now(UTC), machine()  # the load average: is anything else running?
    with target(a) as (url, pid, proc):
        report = asyncio.run(load(a, url, pid))
        alive = proc is None or proc.poll() is None
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m app.bench load " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_before | {"load_average_after": os.getloadavg()},
        "settings": {k: v for k, v in vars(a).items() if k in SETTINGS_SAVED},
    } | report
    report["failures"] = failures(report, a.max_rss_growth, alive)
    print_report(report)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1, default=str))
    return 1 if report["failures"] else 0


SETTINGS_SAVED = {
    "profile", "duration", "peak", "level", "arrivals", "seed", "shares", "timeout_s", "short_timeout_s",
    "cancel_range", "allowance_s", "grace_s", "variant_list", "torch_threads", "set", "max_rss_growth",
    "warmup_s", "rss_window_s",
}  # fmt: skip
