"""`python -m app.bench policies`: the `whole` and `scale` batching policies side by side, same run, same load.

In process, on the engine itself (no HTTP, whose costs are the same under both policies): the pipelines are
loaded once and every measurement runs a fresh engine over them, one image per request, the variants in
turns. First the capacity under each policy: images/s with 2 x max_batch_size clients in a closed loop (each
sends its next request when its last is answered), which keeps batches full without an ever-growing queue;
then open-loop Poisson arrivals at each `--levels` fraction of the `whole` policy's capacity, the same arrival
times and requests for both policies, the policies in alternating order over `--repeats`.

Per policy and level it prints the latency percentiles (arrival to images; `app.bench.stats`: interpolated
between the closest ranks), the wait until the request's first step, images/s completed, and the `scale`
policy's p99 and throughput against `whole`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from app.bench.offline import bench_plans
from app.bench.stats import median, percentile
from app.compress import apply_variant
from app.model.checkpoint import load_folder, random_pipeline
from app.model.config import get_preset
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.serve.engine import Engine, GenerationRequest

TIMEOUT_S = 3600.0


@dataclass
class Run:
    policy: str
    level: float  # offered load, times the `whole` capacity (0: the closed-loop capacity run)
    requests: int
    images_per_s: float
    p50_s: float
    p95_s: float
    p99_s: float
    first_step_p50_s: float  # arrival to the start of the request's first step (batch)
    first_step_p95_s: float


def make_engine(pipes: dict[str, VARPipeline], policy: str, max_batch_size: int, max_wait_s: float) -> Engine:
    """`policy` is a batching policy, `scale+overlap` the scale policy with decoding overlapped."""
    name, _, overlap = policy.partition("+")
    return Engine(
        pipes, max_batch_size=max_batch_size, max_wait_s=max_wait_s, queue_capacity=100_000, policy=name,
        overlap_decode=overlap == "overlap",
    )  # fmt: skip


def requests_for(
    n: int, variants: list[str], num_classes: int, params: SamplingParams, seed: int
) -> list[GenerationRequest]:
    """n one-image requests, the variants in turns, random classes and seeds."""
    rng = random.Random(seed)
    return [
        GenerationRequest(
            variants[i % len(variants)], rng.randrange(num_classes), (rng.randrange(2**31),), params, TIMEOUT_S
        )
        for i in range(n)
    ]


async def drive(
    engine: Engine, requests: list[GenerationRequest], arrivals: list[float] | None, concurrency: int
) -> tuple[list[float], list[float], float]:
    """Send each request at its arrival time (seconds from now), or closed-loop (`arrivals` None: `concurrency`
    clients, each sending its next request when the last is answered); latencies, waits until the first step,
    and the seconds from the first arrival to the last answer."""
    engine.start()
    t0 = time.monotonic()
    out: list[tuple[float, float]] = []

    async def one(req: GenerationRequest) -> None:
        sent = time.monotonic()
        result = await engine.generate(req)
        out.append((time.monotonic() - sent, result.queued_s))

    async def at(req: GenerationRequest, when: float) -> None:
        await asyncio.sleep(max(0.0, t0 + when - time.monotonic()))
        await one(req)

    async def client(queue: list[GenerationRequest]) -> None:
        while queue:
            await one(queue.pop(0))

    if arrivals is None:
        left = list(requests)
        await asyncio.gather(*(client(left) for _ in range(concurrency)))
    else:
        await asyncio.gather(*(at(r, a) for r, a in zip(requests, arrivals, strict=True)))
    span = time.monotonic() - t0 - (arrivals[0] if arrivals else 0.0)
    await engine.stop()
    return [o[0] for o in out], [o[1] for o in out], span


def measure(pipes: dict[str, VARPipeline], policy: str, level: float, requests: list[GenerationRequest],
            arrivals: list[float] | None, a: argparse.Namespace) -> Run:  # fmt: skip
    """One fresh engine under `policy`; `arrivals` None: closed loop, two batches' worth of clients."""
    engine = make_engine(pipes, policy, a.max_batch_size, a.max_wait_ms / 1000)
    latencies, waits, span = asyncio.run(drive(engine, requests, arrivals, 2 * a.max_batch_size))
    return Run(
        policy, level, len(requests), len(requests) / span,
        percentile(latencies, 50), percentile(latencies, 95), percentile(latencies, 99),
        percentile(waits, 50), percentile(waits, 95),
    )  # fmt: skip


def poisson(rate: float, n: int, rng: random.Random) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def load_pipelines(a: argparse.Namespace) -> dict[str, VARPipeline]:
    folder = a.model_dir if a.preset is None else None
    base = load_folder(folder) if folder is not None else random_pipeline(get_preset(a.preset))
    plans = bench_plans(base, folder, a.variant_list, window_plan=None)
    base.to(a.device)
    return {v: apply_variant(v, copy.deepcopy(base), plans=plans) for v in a.variant_list}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench policies", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("model_store/demo"))
    ap.add_argument("--preset", help="a preset's shape with random weights (e.g. d16) instead of --model-dir")
    ap.add_argument("--variants", default="baseline,litevar")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="the engine's max_wait_ms (the server's default)")
    ap.add_argument("--policies", default="whole,scale,scale+overlap", help="whole first: the reference")
    ap.add_argument("--levels", default="0.5,0.9", help="offered loads, times the whole policy's capacity")
    ap.add_argument("--requests", type=int, default=200, help="per level and policy")
    ap.add_argument("--capacity-requests", type=int, default=200, help="of the closed-loop capacity run")
    ap.add_argument("--capacity", type=float, help="images/s of the whole policy; measured when not given")
    ap.add_argument("--repeats", type=int, default=1, help="per level and policy, alternating which goes first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the server's default on 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.variant_list = [v.strip() for v in a.variants.split(",") if v.strip()]
    a.level_list = [float(x) for x in a.levels.split(",")]
    a.policy_list = [x.strip() for x in a.policies.split(",") if x.strip()]
    if a.policy_list[0] != "whole":
        ap.error("--policies must start with whole, the reference of the ratios")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    pipes = load_pipelines(a)
    first = next(iter(pipes.values()))
    params = first.config.default_sampling

    def batch(n: int, seed: int) -> list[GenerationRequest]:
        return requests_for(n, a.variant_list, first.num_classes, params, seed)

    runs: list[Run] = []
    warm = batch(2 * a.max_batch_size, a.seed)  # allocator, kernels, pools: paid before anything is timed
    for policy in a.policy_list:
        measure(pipes, policy, 0.0, warm, None, a)
    closed = batch(a.capacity_requests, a.seed + 1)
    for policy in a.policy_list:
        runs.append(measure(pipes, policy, 0.0, closed, None, a))
        print(f"capacity {policy}: {runs[-1].images_per_s:.2f} images/s", file=sys.stderr)
    capacity = a.capacity or runs[0].images_per_s
    for level in a.level_list:
        rng = random.Random(a.seed + int(1000 * level))
        reqs, arrivals = batch(a.requests, a.seed + 2), poisson(level * capacity, a.requests, rng)
        for r in range(a.repeats):
            for policy in a.policy_list if r % 2 == 0 else a.policy_list[::-1]:
                runs.append(measure(pipes, policy, level, reqs, arrivals, a))
                print(f"level {level} {policy}: p99 {runs[-1].p99_s:.3f} s", file=sys.stderr)
    print_table(runs, capacity, a)
    if a.json:
        a.json.write_text(json.dumps({"capacity": capacity, "runs": [asdict(r) for r in runs]}, indent=1))
    return 0


def median_run(runs: list[Run], policy: str, level: float) -> Run:
    mine = [r for r in runs if r.policy == policy and r.level == level]
    fields = {
        k: median(getattr(r, k) for r in mine) for k in asdict(mine[0]) if k not in ("policy", "level", "requests")
    }
    return Run(policy, level, mine[0].requests, **fields)


def print_table(runs: list[Run], capacity: float, a: argparse.Namespace) -> None:
    shape = f"{a.preset or a.model_dir} on {a.device}"
    print(f"{shape}, variants {','.join(a.variant_list)}, max_batch_size {a.max_batch_size}, "
          f"max_wait_ms {a.max_wait_ms:g}, "
          f"torch threads {a.threads}; whole capacity {capacity:.2f} images/s")  # fmt: skip
    print(f"{'load':>9} {'policy':>13} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
          f"{'first step p50':>14} {'p95':>7} | {'p99 vs whole':>12} {'img/s vs whole':>14}")  # fmt: skip
    for level in dict.fromkeys(r.level for r in runs):
        whole = median_run(runs, "whole", level)
        for policy in a.policy_list:
            r = median_run(runs, policy, level)
            name = "closed" if level == 0 else f"{level:.0%}"
            vs = f"{r.p99_s / whole.p99_s:>11.2f}x {r.images_per_s / whole.images_per_s:>13.2f}x"
            print(f"{name:>9} {policy:>13} {r.images_per_s:>7.2f} {r.p50_s:>7.3f} {r.p95_s:>7.3f} {r.p99_s:>7.3f} "
                  f"{r.first_step_p50_s:>14.3f} {r.first_step_p95_s:>7.3f} | {vs}")  # fmt: skip
