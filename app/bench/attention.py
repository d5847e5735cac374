"""`python -m app.bench attention`: windowed attention against dense attention, kernel by kernel, at a model's
sequence lengths.

For each windowed query scale and batch size (guidance doubles the rows), one layer's attention call on the
route `windowed_attention` installs for the plan (block-sparse key tiles, masked dense, or dense where the
plan keeps everything) and on the model's dense kernel (`DenseAttention`: SDPA over every key), the two in
turns, `--repeats` rounds after a warm-up call each; medians, their ratio, the total over the windowed
scales, the share of pairs the plan keeps and the share the route computes. Every route's output is checked
against the masked dense computation (softmax over the kept pairs only) on the same inputs. Inputs are
random; keys and values are slices of one cache-shaped buffer, as in generation. `--sparse-kernel flex`
times FlexAttention where the CPU default is key tiles; on a shared machine `--threads 1 --clock cpu`
measures the kernels' own CPU time.

```bash
.venv/bin/python -m app.compress band-plan --preset d16 --keep 0.15 --out /tmp/band15.safetensors
.venv/bin/python -m app.bench attention --preset d16 --plan /tmp/band15.safetensors --batch-size 1,8
.venv/bin/python -m app.bench attention --preset d16 --keep 0.15 --json attention.json   # the plan made here
```
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from app.bench.runner import samples_in_turns
from app.bench.stats import median
from app.compress.attention import SPARSE_KERNELS, KeyTiles, PlannedAttention, Route, route_for
from app.compress.attention_passes import WindowedAttention
from app.compress.hardware import detect
from app.compress.plans import load_window_plan
from app.compress.windows import WindowPlan, band_plan
from app.model.blocks import DenseAttention
from app.model.checkpoint import folder_config
from app.model.config import PRESETS, PipelineConfig
from app.model.kv_cache import ScaleStep, scale_steps

SCALE = 0.125  # softmax scale of the random inputs (1 / sqrt(64)); the kernels do not depend on it


@dataclass
class ScaleTiming:
    """One windowed query scale at one batch size: medians in seconds, shares of the scale's pairs."""

    batch_size: int
    rows: int
    scale: int
    queries: int
    keys: int
    route: str  # "sparse tiles", "sparse flex" (FlexAttention), "masked" or "dense"
    kept_share: float  # pairs the plan keeps
    computed_share: float  # pairs the route computes (whole tiles: more than kept)
    dense_s: float
    route_s: float
    max_abs_diff: float  # route output against the masked dense computation

    @property
    def ratio(self) -> float:
        return self.route_s / self.dense_s


def route_name(route: Route) -> str:
    if route.blocks is not None:
        return "sparse tiles" if isinstance(route.blocks, KeyTiles) else "sparse flex"
    return "masked" if route.bias is not None else "dense"


def installed_route(
    kept: torch.Tensor, step: ScaleStep, options: WindowedAttention, device: torch.device, sparse_kernel: str | None
) -> Route:
    """The route `windowed_attention` installs for this mask (the same thresholds and defaults), with the named
    sparse kernel (None: the device's)."""
    min_skipped = options.min_skipped
    if min_skipped is None:
        min_skipped = 0.25 if device.type == "cuda" else 0.5
    skip = min_skipped if step.num_tokens >= options.min_queries else 2.0  # 2.0: never sparse
    return route_for(kept.to(device), skip, sparse_kernel)


def qkv(
    rows: int, heads: int, dim: int, step: ScaleStep, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Random queries of the scale; keys and values as generation passes them: the first `step.end` positions
    of a (rows, heads, seq_len, dim) buffer (a strided view below the last scale)."""
    g = torch.Generator().manual_seed(step.si)
    q = torch.randn(rows, heads, step.num_tokens, dim, generator=g)
    k, v = (torch.randn(rows, heads, seq_len, dim, generator=g)[:, :, : step.end] for _ in range(2))
    return q.to(device), k.to(device), v.to(device)


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * SCALE
    return scores.masked_fill(~kept, float("-inf")).softmax(-1) @ v


# wall: what a request waits; cpu: the process's CPU time, which with one thread is the kernel's own work,
# unaffected by waiting for a core that other processes hold (a shared machine)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def medians_in_turns(
    calls: list[Callable[[], object]], repeats: int, device: torch.device, clock: str = "wall"
) -> list[float]:
    """Median time of each call, the calls run in turns (one warm-up each first)."""
    return [median(s) for s in samples_in_turns(calls, repeats, clock=CLOCKS[clock], device=device)]


def time_scale(
    plan: WindowPlan, layer: int, step: ScaleStep, batch_size: int, repeats: int, options: WindowedAttention,
    device: torch.device, dim: int, clock: str, sparse_kernel: str | None,
) -> ScaleTiming:  # fmt: skip
    kept = plan.kept(layer, step)
    route = installed_route(kept, step, options, device, sparse_kernel)
    planned = PlannedAttention()
    planned.routes[step.si] = route
    dense = DenseAttention()
    rows = 2 * batch_size
    q, k, v = qkv(rows, plan.heads, dim, step, sum(pn * pn for pn in plan.patch_nums), device)
    out = planned(q, k, v, scale=SCALE, attn_bias=None, step=step)
    diff = float((out - masked_reference(q, k, v, kept.to(device))).abs().max())
    dense_s, route_s = medians_in_turns(
        [
            lambda: dense(q, k, v, scale=SCALE, attn_bias=None, step=step),
            lambda: planned(q, k, v, scale=SCALE, attn_bias=None, step=step),
        ],
        repeats,
        device,
        clock,
    )
    all_pairs = kept.numel()
    return ScaleTiming(
        batch_size, rows, step.si, step.num_tokens, step.end, route_name(route), int(kept.sum()) / all_pairs,
        route.pairs(step, plan.heads) / all_pairs, dense_s, route_s, diff,
    )  # fmt: skip


def run(
    plan: WindowPlan, batch_sizes: list[int], *, dim: int, layer: int = 0, repeats: int = 5,
    options: WindowedAttention | None = None, device: torch.device | None = None, clock: str = "wall",
    sparse_kernel: str | None = None,
) -> list[ScaleTiming]:  # fmt: skip
    options = options or WindowedAttention()
    device = device or torch.device("cpu")
    steps = [s for s in scale_steps(plan.patch_nums) if plan.windowed(s.si)]
    with torch.inference_mode():
        return [
            time_scale(plan, layer, s, b, repeats, options, device, dim, clock, sparse_kernel)
            for b in batch_sizes
            for s in steps
        ]


def totals(timings: list[ScaleTiming]) -> dict[int, dict[str, float]]:
    """Per batch size: summed medians over the windowed scales, their ratio, and the pair shares over them."""
    out = {}
    for b in dict.fromkeys(t.batch_size for t in timings):
        ts = [t for t in timings if t.batch_size == b]
        pairs = [t.queries * t.keys for t in ts]
        dense_s, route_s = sum(t.dense_s for t in ts), sum(t.route_s for t in ts)
        out[b] = {
            "dense_s": dense_s,
            "route_s": route_s,
            "ratio": route_s / dense_s,
            "kept_share": sum(t.kept_share * p for t, p in zip(ts, pairs, strict=True)) / sum(pairs),
            "computed_share": sum(t.computed_share * p for t, p in zip(ts, pairs, strict=True)) / sum(pairs),
        }
    return out


def print_table(timings: list[ScaleTiming], layer: int, clock: str = "wall") -> None:
    print(
        f"{'batch':>5} {'rows':>4} {'scale':>5} {'N x P':>10} {'route':<12} {'kept':>6} {'computed':>8} "
        f"{'dense ms':>9} {'route ms':>9} {'ratio':>6} {'max diff':>9}"
    )
    for t in timings:
        print(
            f"{t.batch_size:>5} {t.rows:>4} {t.scale:>5} {f'{t.queries}x{t.keys}':>10} {t.route:<12} "
            f"{100 * t.kept_share:>5.1f}% {100 * t.computed_share:>7.1f}% {1e3 * t.dense_s:>9.2f} "
            f"{1e3 * t.route_s:>9.2f} {t.ratio:>6.2f} {t.max_abs_diff:>9.1e}"
        )
    for b, tot in totals(timings).items():
        print(
            f"batch {b}, windowed scales together: dense {1e3 * tot['dense_s']:.2f} ms, route "
            f"{1e3 * tot['route_s']:.2f} ms, ratio {tot['ratio']:.2f}; pairs kept {100 * tot['kept_share']:.1f}%, "
            f"computed {100 * tot['computed_share']:.1f}%"
        )
    print(
        f"(layer {layer}'s windows; medians of {clock} time; ratio: route over dense; computed: pairs the route "
        "multiplies, whole tiles or blocks; max diff: against the masked dense computation)"
    )


def model_config(a: argparse.Namespace) -> PipelineConfig:
    return folder_config(a.checkpoint) if a.checkpoint else PRESETS[a.preset]


def load_plan(a: argparse.Namespace, config: PipelineConfig) -> WindowPlan:
    var = config.var
    if a.plan is None:
        return band_plan(var.depth, var.num_heads, var.patch_nums, a.keep)
    return load_window_plan(a.plan, var)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench attention", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="d16", help="model shape")
    ap.add_argument("--checkpoint", type=Path, help="the shape of a checkpoint folder (its config) instead")
    plan = ap.add_mutually_exclusive_group(required=True)
    plan.add_argument("--plan", type=Path, help="a window plan file (python -m app.compress band-plan, calibrate)")
    plan.add_argument("--keep", type=float, help="a band plan keeping this share of the pairs, made here")
    ap.add_argument("--batch-size", default="1,8", help="comma-separated; rows are twice as many (guidance)")
    ap.add_argument("--layer", type=int, default=0, help="whose windows (band plans: the same in every layer)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-skipped", type=float, help="the pass's option (default: 0.5 on CPU, 0.25 on GPU)")
    ap.add_argument("--min-queries", type=int, default=WindowedAttention.min_queries, help="the pass's option")
    ap.add_argument("--sparse-kernel", choices=SPARSE_KERNELS, help="default: tiles on CPU, flex on GPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall", help="cpu: process CPU time (with --threads 1)")
    ap.add_argument("--json", type=Path, help="write the timings here")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    a.batch_sizes = [int(b) for b in a.batch_size.split(",") if b]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = model_config(a)
    try:
        plan = load_plan(a, config)
    except (OSError, ValueError) as e:
        print(f"window plan: {e}", file=sys.stderr)
        return 2
    if not 0 <= a.layer < plan.depth:
        print(f"--layer {a.layer}: the model has layers 0..{plan.depth - 1}", file=sys.stderr)
        return 2
    options = WindowedAttention(min_skipped=a.min_skipped, min_queries=a.min_queries)
    print(
        f"machine: {detect().describe()}; {torch.get_num_threads()} threads; shapes of {config.name}; "
        f"plan keeps {100 * plan.kept_fraction(windowed_only=True):.1f}% of the windowed scales' pairs"
    )
    dim = config.var.embed_dim // config.var.num_heads
    timings = run(
        plan, a.batch_sizes, dim=dim, layer=a.layer, repeats=a.repeats, options=options,
        device=torch.device(a.device), clock=a.clock, sparse_kernel=a.sparse_kernel,
    )  # fmt: skip
    print_table(timings, a.layer, a.clock)
    if a.json:
        out = {
            "model": config.name,
            "machine": detect().describe(),
            "threads": torch.get_num_threads(),
            "layer": a.layer,
            "clock": a.clock,
            "timings": [dict(asdict(t), ratio=t.ratio) for t in timings],
            "totals": totals(timings),
        }
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
