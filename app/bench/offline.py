"""`python -m app.bench`: variants side by side from the same weights, in one process, one run.

For each (variant, batch size): one warm-up call, then `--runs` timed calls; medians per stage
(transformer per scale, sampling, latent update, VQVAE decode), images per second, peak RSS, and the
speed-up over the first variant, with the machine probe of `runner`. `--official-src DIR` adds the official
VAR code (a local checkout of FoundationVision/VAR, never part of this project) as contenders (official.py) on the
very same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from app.bench.runner import BenchRecord, Contender, add_speedups, measure, pipeline_runner
from app.compress import VARIANTS, apply_variant
from app.compress.attention_passes import attention_flops
from app.compress.compile_cache import load_compiled, save_compiled
from app.compress.plans import Calibration, Plans, plans_for
from app.compress.sharing import SharingSettings
from app.compress.windows import WindowSettings
from app.model.checkpoint import load_folder, open_pipeline
from app.model.config import PRESETS
from app.model.memory import module_bytes
from app.model.pipeline import VARPipeline
from app.model.timing import Stage

# missing plans are calibrated on 4 images: on random weights a plan measures the mechanism, not a model
FOUR_IMAGES = Calibration(WindowSettings(batches=1, batch_size=4), SharingSettings(batches=1, batch_size=4))


def print_table(records: list[BenchRecord], reference: str) -> None:
    print(
        f"{'variant':<13} {'batch':>5} {'s/batch':>9} {'img/s':>7} {'speedup':>8} {'transf.':>8} "
        f"{'sampling':>8} {'decode':>7} {'peak RSS':>9} {'+infer.':>8} {'weights':>9} {'attn GFLOP':>10} {'share':>6}"
    )
    for r in records:
        sp = f"{r.speedup_vs_baseline:.2f}x" if r.speedup_vs_baseline else "-"
        st = r.stages
        cols = [st.get(k) for k in (Stage.TRANSFORMER, Stage.SAMPLING, Stage.DECODE)]
        cells = " ".join(f"{c:>8.3f}" if c is not None else f"{'-':>8}" for c in cols)
        weights = f"{r.weight_bytes / 2**20:>7.1f}Mi" if r.weight_bytes is not None else f"{'-':>9}"
        flops = f"{r.attention_flops / 1e9:>10.3f}" if r.attention_flops is not None else f"{'-':>10}"
        share = f"{100 * r.attention_share:>5.1f}%" if r.attention_share is not None else f"{'-':>6}"
        print(
            f"{r.variant:<13} {r.batch_size:>5} {r.seconds_per_batch:>9.3f} {r.images_per_second:>7.3f} {sp:>8} "
            f"{cells} {r.peak_rss_bytes / 2**30:>7.2f}Gi {r.inference_rss_bytes / 2**30:>6.2f}Gi {weights} {flops} "
            f"{share}"
        )
    print(
        f"(medians; speed-up relative to '{reference}' at the same batch size; +infer.: peak RSS during the runs "
        "minus RSS before them, i.e. without the resident weights; weights: as stored by the variant; attn GFLOP: "
        "QK^T and PV computed per batch; share: of the reference's)"
    )
    probes = [r.machine_gflops for r in records if r.machine_gflops is not None]
    if probes:
        print(
            f"machine: float32 GEMM probe {min(probes):.0f}-{max(probes):.0f} GFLOP/s over the batch sizes "
            "(median of the rounds; lower means a busier machine)"
        )
    print_kernels(records)
    print_start_times(records)


def print_start_times(records: list[BenchRecord]) -> None:
    """Per variant, what it costs before its first timed call: applying its passes, then the first call at
    each batch size (compilation happens there, and again per batch size where graphs are per shape)."""
    for variant in dict.fromkeys(r.variant for r in records):
        mine = [r for r in records if r.variant == variant]
        build = f"passes {mine[0].build_seconds:.2f} s, " if mine[0].build_seconds is not None else ""
        first = ", ".join(f"batch {r.batch_size} {r.first_call_seconds:.2f} s" for r in mine)
        print(f"start {variant}: {build}first call {first}")


def print_kernels(records: list[BenchRecord]) -> None:
    """The CPU kind, then per variant the kernel each layer type ran (as installed, not as planned)."""
    if not records:
        return
    r = records[0]
    flags = ", ".join(f for f, present in r.cpu_flags.items() if present) or "none of avx2/avx512/amx"
    forced = f", kernels chosen for {r.cpu_isa} (forced)" if r.cpu_isa_forced else ""
    gpu = f"; GPU {r.gpu}" if r.gpu else ""
    print(f"cpu: {r.cpu_model} ({flags}){forced}{gpu}")
    for variant in dict.fromkeys(x.variant for x in records):
        rec = next(x for x in records if x.variant == variant)
        if rec.layer_kernels:
            kernels = ", ".join(f"{layer} {kernel}" for layer, kernel in rec.layer_kernels.items())
            print(f"kernels {variant}: {kernels}{'; step compiled' if rec.step_compiled else ''}")


def measure_load_seconds(pipe: VARPipeline) -> float:
    """Write the weights as released-format .pth files, then time loading them back (strict)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(pipe.config.to_dict()))
        torch.save(pipe.var.state_dict(), folder / "var.pth")
        torch.save(pipe.vqvae.state_dict(), folder / "vae.pth")
        t0 = time.perf_counter()
        load_folder(folder)
        return time.perf_counter() - t0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="d16", help="model shape (random weights)")
    ap.add_argument("--checkpoint", type=Path, help="benchmark a checkpoint folder instead of random weights")
    ap.add_argument("--variants", default="baseline", help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cfg", type=float, help="sampling overrides (default: the model's own settings)")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument(
        "--official-src",
        type=Path,
        help="checkout of the official VAR code: adds variants 'official', 'official-bf16' (under bfloat16 "
        "autocast, where bfloat16 is native) and, on CPU, 'official-int8' (torch's dynamic int8 linears)",
    )
    ap.add_argument(
        "--window-plan",
        type=Path,
        help="window plan for every windowed variant (e.g. `python -m app.compress band-plan`), instead of the "
        "checkpoint's or one calibrated on random weights",
    )
    ap.add_argument("--measure-load", action="store_true", help="also time loading the weights from local files")
    ap.add_argument(
        "--compile-cache",
        type=Path,
        help="a compile cache file (app/compress/compile_cache.py): loaded before anything compiles when it exists, "
        "else written at the end, as the server does",
    )
    ap.add_argument("--json", type=Path, help="write the records here")
    ap.add_argument("--plot", type=Path, help="write a PNG of speed-up and attention FLOPs per variant here")
    a = ap.parse_args(argv)
    a.variant_list = [v for v in a.variants.split(",") if v]
    unknown = [v for v in a.variant_list if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    a.batch_size_list = [int(b) for b in a.batch_sizes.split(",") if b]
    return a


def contenders(a: argparse.Namespace, base: VARPipeline, plans: Plans) -> Iterator[Contender]:
    """Every variant, each built from a copy of `base`, and the official code when asked for."""
    params = base.config.default_sampling.overridden(a.cfg, a.top_k, a.top_p)
    for name in a.variant_list:
        pipe = copy.deepcopy(base) if len(a.variant_list) > 1 else base
        t0 = time.perf_counter()
        pipe = apply_variant(name, pipe, plans=plans)
        yield Contender(name, pipeline_runner(pipe, params), pipe, build_seconds=time.perf_counter() - t0)
    if a.official_src is not None:
        from app.bench.official import official_runners

        for name, runner in official_runners(a.official_src, base, params).items():
            yield Contender(name, runner, None)


def bench_plans(
    base: VARPipeline,
    folder: Path | None,
    variants: Sequence[str],
    window_plan: Path | None,
    calibration: Calibration = FOUR_IMAGES,
) -> Plans:
    """The plans `variants` take: those saved in the checkpoint `folder` (None: random weights, none saved),
    the missing ones calibrated once on `base` with `calibration` (both from one run when both are missing)
    for every variant to share. On random weights a plan measures the mechanism (at d16 the window plan comes
    out nearly dense). `window_plan` (`--window-plan`), e.g. a band plan, replaces any window plan (ValueError
    when it is for another model shape)."""
    specs = [VARIANTS[v] for v in variants]
    return plans_for(base, folder, specs, calibrate_missing=True, calibration=calibration, window_plan_file=window_plan)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = open_pipeline(a.checkpoint, None if a.checkpoint else a.preset, a.checkpoint is None).to(a.device)
    preset = base.config.name
    load_s = measure_load_seconds(base) if a.measure_load else None
    try:
        plans = bench_plans(base, a.checkpoint, a.variant_list, a.window_plan)
    except (OSError, ValueError) as e:
        if a.window_plan is None:
            raise
        sys.exit(f"--window-plan {a.window_plan}: {e}")
    cache_loaded = load_compiled(a.compile_cache) if a.compile_cache else False
    records = run_all(a, base, preset, plans)
    if a.compile_cache and not cache_loaded:
        print(f"compile cache: {save_compiled(a.compile_cache)} bytes saved to {a.compile_cache}", file=sys.stderr)
    reference = a.variant_list[0]
    add_speedups(records, reference)
    print_table(records, reference)
    if load_s is not None:
        print(f"load {preset} weights from local .pth files: {load_s:.2f} s")
    if a.json:
        out: list[dict[str, Any]] = [dict(asdict(r), load_seconds=load_s) for r in records]
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    if a.plot:
        from app.bench.plots import bench_plot

        bench_plot([asdict(r) for r in records], a.plot)
    return 0


def run_all(a: argparse.Namespace, base: VARPipeline, preset: str, plans: Plans) -> list[BenchRecord]:
    everyone = list(contenders(a, base, plans))
    records = []
    for bs in a.batch_size_list:
        for rec, c in zip(measure(everyone, preset=preset, device=a.device, batch_size=bs, runs=a.runs,
                                  num_classes=base.num_classes), everyone, strict=True):  # fmt: skip
            if c.pipe is not None:
                rec.weight_bytes = module_bytes(c.pipe.var, c.pipe.vqvae)
                rec.attention_flops = attention_flops(c.pipe, bs)
            records.append(rec)
            print(
                f"{c.name} batch {bs}: {rec.seconds_per_batch:.3f} s (runs {rec.seconds_per_batch_all})",
                file=sys.stderr,
            )
    order = {name: i for i, name in enumerate(c.name for c in everyone)}
    return sorted(records, key=lambda r: (order[r.variant], r.batch_size))


if __name__ == "__main__":
    sys.exit(main())
