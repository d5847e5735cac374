"""`python -m app.bench load`: the command line, and one run from capacity to report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import sys
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.bench.launcher import launched, wait_ready
from app.bench.load.client import ConnectionPerRequest, run_schedule
from app.bench.load.plan import LOOPBACK, Mix, ServerLimits, arrival_times, plan_requests, ramp_profile, steady_profile
from app.bench.load.report import failures, overload_goodput, print_report, summarize
from app.bench.load.server import CAPACITY_BURSTS, RssSampler, measure_capacity, rss_growth, server_info


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
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="of the started server (0: its default, every CPU; the tool takes little)")  # fmt: skip
    ap.add_argument("--set", type=key_value, action="append", default=[], metavar="VAR_NAME=VALUE",
                    help="a further setting of the started server (repeatable)")  # fmt: skip
    ap.add_argument("--server-log", type=Path, help="where the started server's output goes")
    ap.add_argument("--profile", choices=("ramp", "steady"), default="ramp")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of the profile")
    ap.add_argument("--peak", type=float, default=4.0, help="ramp: highest offered load, times the capacity")
    ap.add_argument("--level", type=float, default=1.0, help="steady: offered load, times the capacity")
    ap.add_argument("--capacity", type=float, help="images per second; measured with a closed-loop burst if not given")
    ap.add_argument("--capacity-requests", type=int, default=128, help="timed requests of each capacity burst")
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
    ap.add_argument("--min-goodput", type=float, help="fail below this overload goodput (0.95); not checked if unset")
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
    env = {"VAR_MODEL_DIR": str(a.model_dir), "VAR_VARIANTS": ",".join(a.variant_list)}
    if a.torch_threads:
        env |= {"VAR_TORCH_THREADS": str(a.torch_threads), "OMP_NUM_THREADS": str(a.torch_threads)}
    env |= dict(a.set)
    with launched(env, a.server_log, ready_limit_s=a.ready_limit_s) as server:
        yield server.url, server.proc.pid, server.proc


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
            bursts = f"median of {CAPACITY_BURSTS} bursts of {a.capacity_requests} one-image requests"
            source = f"measured: {bursts}, closed loop"
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
        "overload_goodput_ratio": overload_goodput(report["phases"], capacity),
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
    report["failures"] = failures(report, a.max_rss_growth, alive, a.min_goodput)
    print_report(report)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1, default=str))
    return 1 if report["failures"] else 0


SETTINGS_SAVED = {
    "profile", "duration", "peak", "level", "arrivals", "seed", "shares", "timeout_s", "short_timeout_s",
    "cancel_range", "allowance_s", "grace_s", "variant_list", "torch_threads", "set", "max_rss_growth",
    "warmup_s", "rss_window_s", "min_goodput",
}  # fmt: skip
