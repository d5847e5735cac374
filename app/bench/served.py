"""`python -m app.bench serve`: the running service against the best the machine does offline, on loopback.

For each variant, the offline pipeline (same weights, same sampling, in this process, while the server is
idle) at every thread count from 1 to the CPUs this process may use, in turns: its best median latency at
batch 1 and its best throughput at the server's max_batch_size, each at the thread count that won (and the
figures at the server's own thread count beside them). Then against the server:
- concurrency 1: median end-to-end latency of one-image requests (target <= 1.05 x best offline + 15 ms);
- concurrency C: images per second (target >= 0.9 x best offline at max_batch_size) and the mean batch size,
  read from /metrics (target >= 0.8 x max_batch_size).
Our client and `hey` (an independent load tool, when installed) measure each in alternating rounds, so the
report shows whether they agree within our own run-to-run spread. The server is started here (`--model-dir`)
or targeted (`--url`, with `--model-dir` naming its model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from app.bench import hey, prometheus_text
from app.bench.launcher import launched, wait_ready
from app.bench.runner import Contender, Runner, measure, pipeline_runner
from app.bench.stats import median
from app.compress import apply_variant, variant_spec
from app.compress.plans import plans_for
from app.model.checkpoint import load_folder
from app.model.sampling import SamplingParams

ROUNDS = 2  # of each served measurement, alternating with hey's: their spread is the run-to-run spread


@dataclass(frozen=True)
class Offline:
    threads: int
    latency_s: float  # batch 1, median
    images_per_s: float  # batch max_batch_size


@dataclass
class Served:
    """One served figure from our client's rounds and hey's (None without hey)."""

    ours: list[float]
    hey: list[float] = field(default_factory=list)

    @property
    def value(self) -> float:
        return median(self.ours)

    @property
    def agrees(self) -> bool | None:
        """hey's median within our rounds' spread (at least 5% of our median) of ours; None without hey."""
        if not self.hey:
            return None
        spread = max(max(self.ours) - min(self.ours), 0.05 * self.value)
        return abs(median(self.hey) - self.value) <= spread


@dataclass
class ServeRecord:
    variant: str
    max_batch_size: int
    concurrency: int
    server_threads: int
    offline: list[Offline]  # per thread count
    best_latency_threads: int
    offline_latency_s: float  # the best at batch 1
    best_throughput_threads: int
    offline_images_per_s: float  # the best at max_batch_size
    latency: Served  # seconds, concurrency 1, median end to end
    throughput: Served  # images per second at `concurrency`
    latency_target_s: float
    mean_batch_size: float
    latency_ok: bool
    throughput_ok: bool
    batching_ok: bool
    device: str
    torch_version: str = torch.__version__

    def at_server_threads(self) -> Offline | None:
        return next((o for o in self.offline if o.threads == self.server_threads), None)


def mean_batch_size(url: str, variant: str) -> tuple[float, float]:
    """(sum, count) of var_batch_size_images for the variant, from /metrics."""
    samples = prometheus_text.scrape(f"{url}/metrics")
    sums = prometheus_text.total(samples, "var_batch_size_images_sum", variant=variant)
    return sums, prometheus_text.total(samples, "var_batch_size_images_count", variant=variant)


def request_body(variant: str, params: SamplingParams, seed: int) -> dict[str, Any]:
    return {"class_label": seed % 10, "seed": seed, "variant": variant, **asdict(params)}


def one_client_seconds(
    url: str, variant: str, params: SamplingParams, n: int, first_seed: int = 1000, pause_s: float = 0.0
) -> list[float]:
    """End-to-end seconds of n one-image requests sent one after another (after 3 unmeasured ones), each
    `pause_s` after the answer to the last."""
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(3):  # warm-up: connection, first encodes
            client.post("/generate", json=request_body(variant, params, i)).raise_for_status()
        seconds = []
        for i in range(n):
            time.sleep(pause_s)
            t0 = time.perf_counter()
            client.post("/generate", json=request_body(variant, params, first_seed + i)).raise_for_status()
            seconds.append(time.perf_counter() - t0)
    return seconds


async def closed_loop_rate(url: str, variant: str, params: SamplingParams, concurrency: int, n: int) -> float:
    next_seed = iter(range(10_000, 10_000 + n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for seed in next_seed:
            (await client.post("/generate", json=request_body(variant, params, seed))).raise_for_status()

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


def threaded(runner: Runner, threads: int) -> Runner:
    """The runner at `threads` torch threads: contenders that differ only in their thread count, timed in turns."""

    def run(labels: list[int], seed: int) -> dict[str, float]:
        torch.set_num_threads(threads)
        return runner(labels, seed)

    return run


def measure_offline(a: argparse.Namespace, variant: str, max_batch: int, params: SamplingParams) -> list[Offline]:
    """The variant offline at every thread count of `a.thread_counts`, in turns."""
    base = load_folder(a.model_dir).to(a.device)
    # the plans the server loads: those saved beside the checkpoint (it calibrates none unless told to)
    pipe = apply_variant(variant, base, plans=plans_for(base, a.model_dir, [variant_spec(variant)]))
    run = pipeline_runner(pipe, params)
    contenders = [Contender(f"{t} threads", threaded(run, t), pipe) for t in a.thread_counts]
    common = {"preset": pipe.config.name, "device": a.device, "num_classes": pipe.num_classes}
    one = measure(contenders, batch_size=1, runs=a.offline_runs, **common)
    full = measure(contenders, batch_size=max_batch, runs=max(1, a.offline_runs // 2), **common)
    return [
        Offline(t, r1.seconds_per_batch, rn.images_per_second)
        for t, r1, rn in zip(a.thread_counts, one, full, strict=True)
    ]


def measure_served(
    a: argparse.Namespace, url: str, variant: str, params: SamplingParams
) -> tuple[Served, Served, float]:
    """Latency at concurrency 1 and images per second at `a.concurrency`, our client's rounds alternating with
    hey's; and the mean batch size of our client's loaded rounds."""
    latency, throughput = Served([]), Served([])
    use_hey = hey.available() and not a.no_hey
    body = request_body(variant, params, 7)
    for _ in range(ROUNDS):
        latency.ours.append(median(one_client_seconds(url, variant, params, a.requests)))
        if use_hey:
            latency.hey.append(hey.run(f"{url}/generate", body, a.requests, 1).median_s)
    s0, c0 = mean_batch_size(url, variant)
    for _ in range(ROUNDS):
        throughput.ours.append(asyncio.run(closed_loop_rate(url, variant, params, a.concurrency, a.load_requests)))
        if use_hey:
            throughput.hey.append(hey.run(f"{url}/generate", body, a.load_requests, a.concurrency).requests_per_s)
    s1, c1 = mean_batch_size(url, variant)
    return latency, throughput, (s1 - s0) / max(c1 - c0, 1)


def bench_variant(
    a: argparse.Namespace, url: str, variant: str, info: dict[str, Any], params: SamplingParams
) -> ServeRecord:
    max_batch = int(info["limits"]["max_batch_size"])
    by_threads = measure_offline(a, variant, max_batch, params)
    fastest = min(by_threads, key=lambda o: o.latency_s)
    widest = max(by_threads, key=lambda o: o.images_per_s)
    latency, throughput, batch = measure_served(a, url, variant, params)
    target = 1.05 * fastest.latency_s + 0.015
    return ServeRecord(
        variant=variant,
        max_batch_size=max_batch,
        concurrency=a.concurrency,
        server_threads=int(info["torch_threads"]),
        offline=by_threads,
        best_latency_threads=fastest.threads,
        offline_latency_s=fastest.latency_s,
        best_throughput_threads=widest.threads,
        offline_images_per_s=widest.images_per_s,
        latency=latency,
        throughput=throughput,
        latency_target_s=target,
        mean_batch_size=batch,
        latency_ok=latency.value <= target,
        throughput_ok=throughput.value >= 0.9 * widest.images_per_s,
        batching_ok=batch >= 0.8 * max_batch,
        device=a.device,
    )


def print_table(records: list[ServeRecord]) -> None:
    print(
        f"{'variant':<10} {'offline b1':>14} {'same thr':>8} {'served c1':>9} {'hey c1':>8} {'target':>7} {'ok':>3} | "
        f"{'offline bN':>16} {'same thr':>8} {'served cN':>9} {'hey cN':>7} {'ratio':>6} {'ok':>3} | "
        f"{'mean batch':>10} {'ok':>3}"
    )
    for r in records:
        same = r.at_server_threads()
        print(
            f"{r.variant:<10} {_ms(r.offline_latency_s):>8} ({r.best_latency_threads:>2} t) "
            f"{_ms(same.latency_s if same else None):>8} {_ms(r.latency.value):>9} {_ms(_hey(r.latency)):>8} "
            f"{_ms(r.latency_target_s):>7} {_yes(r.latency_ok):>3} | "
            f"{r.offline_images_per_s:>7.1f} im/s ({r.best_throughput_threads:>2} t) "
            f"{_rate(same.images_per_s if same else None):>8} {_rate(r.throughput.value):>9} "
            f"{_rate(_hey(r.throughput)):>7} {r.throughput.value / r.offline_images_per_s:>5.2f}x "
            f"{_yes(r.throughput_ok):>3} | {r.mean_batch_size:>6.2f}/{r.max_batch_size:<3} {_yes(r.batching_ok):>3}"
        )
    print(
        "(offline: the best over thread counts (t: the count that won), then at the server's own thread count; "
        "b1: batch 1 latency, median; bN: batch max_batch_size; c1 / cN: client concurrency 1 / N; hey: the same "
        "requests from hey)"
    )
    served_latency = {r.variant: r.latency.value for r in records}
    for r in records:
        if r.variant != "baseline" and "baseline" in served_latency:
            print(f"{r.variant} served at concurrency 1: {served_latency['baseline'] / r.latency.value:.2f}x baseline")


def _hey(s: Served) -> float | None:
    return median(s.hey) if s.hey else None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}ms"


def _rate(per_s: float | None) -> str:
    return "-" if per_s is None else f"{per_s:.1f}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def to_json(r: ServeRecord) -> dict[str, Any]:
    """The record with each served figure's median and whether hey agrees with it."""
    out = asdict(r)
    for name in ("latency", "throughput"):
        figure: Served = getattr(r, name)
        out[name] |= {"median": figure.value, "hey_median": _hey(figure), "hey_agrees": figure.agrees}
    return out


def thread_counts(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]; empty: every count from 1 to the CPUs this process may run on (taskset applies)."""
    if not text:
        return list(range(1, len(os.sched_getaffinity(0)) + 1))
    counts = sorted({int(t) for t in text.split(",") if t})
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be positive integers, got {text!r}")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("model_store/demo"), help="the served checkpoint folder")
    ap.add_argument("--url", help="benchmark this running server instead of starting one")
    ap.add_argument("--variants", default="baseline", help="comma-separated; each must be loaded by the server")
    ap.add_argument("--max-batch-size", type=int, default=8, help="of the started server (VAR_MAX_BATCH_SIZE)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="of the started server (VAR_MAX_WAIT_MS)")
    ap.add_argument("--set", action="append", default=[], metavar="VAR_NAME=VALUE",
                    help="a further setting of the started server (repeatable)")  # fmt: skip
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50, help="sequential requests at concurrency 1, per round")
    ap.add_argument("--load-requests", type=int, default=400, help="requests at --concurrency, per round")
    ap.add_argument("--offline-runs", type=int, default=20, help="timed offline runs at batch 1 (half at batch N)")
    ap.add_argument("--threads", type=thread_counts, default=thread_counts(""), dest="thread_counts",
                    help="offline thread counts, comma-separated (default: 1 to the usable CPUs)")  # fmt: skip
    ap.add_argument("--no-hey", action="store_true", help="do not run hey beside our client even where installed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--server-log", type=Path, help="where the started server's output goes")
    ap.add_argument("--json", type=Path, help="write the records here")
    a = ap.parse_args(argv)
    a.variant_list = [v for v in a.variants.split(",") if v]
    return a


@contextmanager
def target(a: argparse.Namespace) -> Iterator[str]:
    if a.url:
        wait_ready(a.url)
        yield a.url
        return
    env = {
        "VAR_MODEL_DIR": str(a.model_dir),
        "VAR_VARIANTS": ",".join(a.variant_list),
        "VAR_MAX_BATCH_SIZE": str(a.max_batch_size),
        "VAR_MAX_WAIT_MS": str(a.max_wait_ms),
        "VAR_QUEUE_CAPACITY": str(max(64, 2 * a.concurrency)),
        "VAR_DEVICE": a.device,
    }
    env |= dict(item.split("=", 1) for item in a.set)
    with launched(env, a.server_log) as server:
        yield server.url


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with target(a) as url:
        info = httpx.get(f"{url}/models", timeout=10).json()
        params = SamplingParams(**info["defaults"])
        records = []
        for variant in a.variant_list:
            records.append(bench_variant(a, url, variant, info, params))
            print(f"{variant}: {to_json(records[-1])}", file=sys.stderr, flush=True)
    print_table(records)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps([to_json(r) for r in records], indent=1))
    return 0
