"""`python -m app.bench serve`: the running service against the offline pipeline, on loopback.

For each variant: the offline pipeline's median latency at batch 1 and throughput at the server's
max_batch_size (same weights, same sampling, in this process), then against the server
- concurrency 1: median end-to-end latency of one-image requests (target <= 1.05 x offline + 15 ms);
- concurrency C: images per second (target >= 0.9 x offline at max_batch_size) and the mean batch size,
  read from /metrics (target >= 0.8 x max_batch_size).
The server is started here (`--model-dir`) or targeted (`--url`, with `--model-dir` naming its model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from app.bench import prometheus_text
from app.bench.launcher import launched, wait_ready
from app.bench.runner import Contender, measure, pipeline_runner
from app.bench.stats import median
from app.compress import apply_variant, variant_spec
from app.compress.plans import plans_for
from app.model.checkpoint import load_folder
from app.model.sampling import SamplingParams


@dataclass
class ServeRecord:
    variant: str
    max_batch_size: int
    concurrency: int
    offline_latency_s: float  # batch 1, median
    served_latency_s: float  # concurrency 1, median end to end
    latency_target_s: float
    offline_images_per_s: float  # batch max_batch_size
    served_images_per_s: float  # at `concurrency`
    mean_batch_size: float
    latency_ok: bool
    throughput_ok: bool
    batching_ok: bool
    device: str
    threads: int
    torch_version: str = torch.__version__


def mean_batch_size(url: str, variant: str) -> tuple[float, float]:
    """(sum, count) of var_batch_size_images for the variant, from /metrics."""
    samples = prometheus_text.scrape(f"{url}/metrics")
    sums = prometheus_text.total(samples, "var_batch_size_images_sum", variant=variant)
    return sums, prometheus_text.total(samples, "var_batch_size_images_count", variant=variant)


def request_body(variant: str, params: SamplingParams, seed: int) -> dict[str, Any]:
    return {"class_label": seed % 10, "seed": seed, "variant": variant, **asdict(params)}


def served_latency(url: str, variant: str, params: SamplingParams, n: int) -> float:
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(3):  # warm-up: connection, first encodes
            client.post("/generate", json=request_body(variant, params, i)).raise_for_status()
        seconds = []
        for i in range(n):
            t0 = time.perf_counter()
            client.post("/generate", json=request_body(variant, params, 1000 + i)).raise_for_status()
            seconds.append(time.perf_counter() - t0)
    return median(seconds)


async def _load(url: str, variant: str, params: SamplingParams, concurrency: int, n: int) -> float:
    next_seed = iter(range(10_000, 10_000 + n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for seed in next_seed:
            (await client.post("/generate", json=request_body(variant, params, seed))).raise_for_status()

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


def served_throughput(url: str, variant: str, params: SamplingParams, concurrency: int, n: int) -> tuple[float, float]:
    """Images per second with `concurrency` clients sending one-image requests, and the mean batch size."""
    s0, c0 = mean_batch_size(url, variant)
    images_per_s = asyncio.run(_load(url, variant, params, concurrency, n))
    s1, c1 = mean_batch_size(url, variant)
    return images_per_s, (s1 - s0) / max(c1 - c0, 1)


def bench_variant(a: argparse.Namespace, url: str, variant: str, max_batch: int, params: SamplingParams) -> ServeRecord:
    """Offline at the server's own thread count, then served: the difference is the service's alone."""
    base = load_folder(a.model_dir).to(a.device)
    # the plans the server loads: those saved beside the checkpoint (it calibrates none unless told to)
    pipe = apply_variant(variant, base, plans=plans_for(base, a.model_dir, [variant_spec(variant)]))
    one = [Contender(variant, pipeline_runner(pipe, params), pipe)]
    common = {"preset": pipe.config.name, "device": a.device, "num_classes": pipe.num_classes}
    offline_1 = measure(one, batch_size=1, runs=a.offline_runs, **common)[0]
    offline_b = measure(one, batch_size=max_batch, runs=max(1, a.offline_runs // 2), **common)[0]
    del pipe, one
    latency = served_latency(url, variant, params, a.requests)
    throughput, batch = served_throughput(url, variant, params, a.concurrency, a.load_requests)
    target = 1.05 * offline_1.seconds_per_batch + 0.015
    return ServeRecord(
        variant=variant,
        max_batch_size=max_batch,
        concurrency=a.concurrency,
        offline_latency_s=offline_1.seconds_per_batch,
        served_latency_s=latency,
        latency_target_s=target,
        offline_images_per_s=offline_b.images_per_second,
        served_images_per_s=throughput,
        mean_batch_size=batch,
        latency_ok=latency <= target,
        throughput_ok=throughput >= 0.9 * offline_b.images_per_second,
        batching_ok=batch >= 0.8 * max_batch,
        device=a.device,
        threads=torch.get_num_threads(),
    )


def print_table(records: list[ServeRecord]) -> None:
    print(
        f"{'variant':<10} {'offline b1':>10} {'served c1':>10} {'target':>8} {'ok':>3} | {'offline bN':>10} "
        f"{'served cN':>10} {'ratio':>6} {'ok':>3} | {'mean batch':>10} {'ok':>3}"
    )
    for r in records:
        ratio = r.served_images_per_s / r.offline_images_per_s
        print(
            f"{r.variant:<10} {1000 * r.offline_latency_s:>8.1f}ms {1000 * r.served_latency_s:>8.1f}ms "
            f"{1000 * r.latency_target_s:>6.1f}ms {_yes(r.latency_ok):>3} | {r.offline_images_per_s:>6.1f} im/s "
            f"{r.served_images_per_s:>6.1f} im/s {ratio:>5.2f}x {_yes(r.throughput_ok):>3} | "
            f"{r.mean_batch_size:>6.2f}/{r.max_batch_size:<3} {_yes(r.batching_ok):>3}"
        )
    print("(b1: batch 1 latency, median; bN: batch max_batch_size; c1 / cN: client concurrency 1 / N)")


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("model_store/demo"), help="the served checkpoint folder")
    ap.add_argument("--url", help="benchmark this running server instead of starting one")
    ap.add_argument("--variants", default="baseline", help="comma-separated; each must be loaded by the server")
    ap.add_argument("--max-batch-size", type=int, default=8, help="of the started server (VAR_MAX_BATCH_SIZE)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="of the started server (VAR_MAX_WAIT_MS)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50, help="sequential requests at concurrency 1")
    ap.add_argument("--load-requests", type=int, default=400, help="requests at --concurrency")
    ap.add_argument("--offline-runs", type=int, default=20, help="timed offline runs at batch 1 (half at batch N)")
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
    with launched(env, a.server_log) as server:
        yield server.url


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with target(a) as url:
        info = httpx.get(f"{url}/models", timeout=10).json()
        params = SamplingParams(**info["defaults"])
        max_batch = int(info["limits"]["max_batch_size"])
        torch.set_num_threads(int(info["torch_threads"]))  # the offline side computes as the server does
        records = []
        for variant in a.variant_list:
            records.append(bench_variant(a, url, variant, max_batch, params))
            print(f"{variant}: {records[-1]}", file=sys.stderr, flush=True)
    print_table(records)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps([asdict(r) for r in records], indent=1))
    return 0
