"""Shared measurement: runners (one call generating a batch), timing in turns, records, the machine probe.

Contenders are timed in turns, `runs` rounds after one warm-up call each: drift of a shared machine then
hits every contender alike. Before each round a float32 GEMM probe records how fast the machine is at that
moment (GFLOP/s), so absolute times from a shared, noisy machine come with its state. Every record also names
the machine (CPU model, the ISA flags int8 and bfloat16 kernels depend on, GPU) and, per variant, the kernel
each layer type ran, read from the installed modules.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.bench.stats import median
from app.compress.hardware import detect, detected
from app.compress.quantize import layer_kernels
from app.model import memory
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.model.timing import StageTimer

# One call generating a batch: (labels, seed) -> seconds per stage (empty when the runner cannot tell).
Runner = Callable[[list[int], int], dict[str, float]]


@dataclass
class BenchRecord:
    variant: str
    preset: str
    device: str
    batch_size: int
    runs: int
    seconds_per_batch: float
    seconds_per_batch_all: list[float]
    images_per_second: float
    peak_rss_bytes: int
    inference_rss_bytes: int  # peak RSS during the timed runs minus RSS before them (models excluded)
    peak_gpu_bytes: int | None
    stages: dict[str, float]
    weight_bytes: int | None = None  # the variant's weights as stored (int8 packed, bf16, float32)
    attention_flops: int | None = None  # QK^T and PV computed per batch, from the kernels installed
    attention_share: float | None = None  # attention_flops over the baseline's
    speedup_vs_baseline: float | None = None
    threads: int = 0
    machine_gflops: float | None = None  # median of the GEMM probe over the rounds (CPU only)
    machine_gflops_all: list[float] = field(default_factory=list)
    torch_version: str = torch.__version__
    cpu_model: str = ""
    cpu_isa: str = ""  # the ISA level the kernel tables read (app.compress.hardware), forced or detected
    cpu_isa_forced: bool = False
    cpu_flags: dict[str, bool] = field(default_factory=dict)  # the real CPU's avx2, avx512f, avx512_vnni, ..., amx
    gpu: str | None = None
    layer_kernels: dict[str, str] = field(default_factory=dict)  # layer type -> kernel; empty: not our code
    step_compiled: bool = False
    build_seconds: float | None = None  # applying the variant's passes (calibration, packing); None: not ours
    first_call_seconds: float | None = None  # the untimed warm-up call at this batch size: compilation included


def pipeline_runner(pipe: VARPipeline, params: SamplingParams) -> Runner:
    def run(labels: list[int], seed: int) -> dict[str, float]:
        timer = StageTimer(pipe.device)
        pipe.generate(labels, params, seeds=[seed + i for i in range(len(labels))], timer=timer)
        stages = dict(timer.seconds)  # the transformer per scale, and in total from `stage_seconds`
        for stage, seconds in timer.stage_seconds().items():
            stages[stage] = seconds
        return stages

    return run


def samples_in_turns(
    calls: list[Callable[[], object]],
    repeats: int,
    *,
    warmups: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    device: torch.device | None = None,
) -> list[list[float]]:
    """`repeats` timings of each call, the calls run in turns so that a shared machine's drift hits them
    alike, after `warmups` untimed rounds (compilation, oneDNN's primitive caches, page-in)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(warmups + repeats):
        for call, samples in zip(calls, times, strict=True):
            sync()
            t0 = clock()
            call()
            sync()
            if round_ >= warmups:
                samples.append(clock() - t0)
    return times


PROBE_SIZE = 512  # a 512^3 float32 matmul: about 2 ms on 2 AVX2 cores, fast enough to run every round


def machine_gflops(device: str) -> float | None:
    """Float32 GEMM throughput right now (best of 3), or None off the CPU. Other tenants of a shared machine
    slow it down by up to 2x within an hour; this figure says which state a run's times come from."""
    if device != "cpu":
        return None
    a, b = torch.randn(PROBE_SIZE, PROBE_SIZE), torch.randn(PROBE_SIZE, PROBE_SIZE)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * PROBE_SIZE**3 / best / 1e9


def bench_labels(batch_size: int, num_classes: int) -> list[int]:
    return [(207 + 97 * i) % num_classes for i in range(batch_size)]


@dataclass
class Samples:
    """One contender's timed calls at one batch size."""

    totals: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    peak_rss: int = 0
    inference_rss: int = 0
    peak_gpu: int | None = None

    def time(self, runner: Runner, labels: list[int], seed: int, device: str) -> None:
        memory.reset_peak(device)
        before = memory.rss_bytes()
        t0 = time.perf_counter()
        self.stages.append(runner(labels, seed))
        self.totals.append(time.perf_counter() - t0)
        peak = memory.peak_rss_bytes()
        self.peak_rss, self.inference_rss = max(self.peak_rss, peak), max(self.inference_rss, peak - before)
        gpu = memory.peak_gpu_bytes(device)
        self.peak_gpu = None if gpu is None else max(self.peak_gpu or 0, gpu)


def measure(contenders: list[Contender], *, preset: str, device: str, batch_size: int, runs: int,
            num_classes: int) -> list[BenchRecord]:  # fmt: skip
    """Warm every contender up, then time them in turns, `runs` rounds: drift of a shared machine (other
    jobs, clocks) then hits every contender alike instead of whichever ran during it."""
    labels = bench_labels(batch_size, num_classes)
    first_call: dict[str, float] = {}
    for c in contenders:
        t0 = time.perf_counter()
        c.runner(labels, 0)  # warm-up: allocator, kernels, compilation, page-in of weights
        first_call[c.name] = time.perf_counter() - t0
    samples = {c.name: Samples() for c in contenders}
    probe: list[float] = []
    for r in range(runs):
        if (gflops := machine_gflops(device)) is not None:
            probe.append(gflops)
        for c in contenders:
            samples[c.name].time(c.runner, labels, 1000 * (r + 1), device)
    records = [_record(c.name, samples[c.name], preset, device, batch_size, probe) for c in contenders]
    for record, c in zip(records, contenders, strict=True):
        describe_kernels(record, c.pipe)
        record.build_seconds, record.first_call_seconds = c.build_seconds, first_call[c.name]
    return records


def describe_kernels(record: BenchRecord, pipe: VARPipeline | None) -> None:
    """The machine as it is, the ISA level the kernel tables read (forced or not), and the kernels `pipe` runs
    per layer type (none for the official code)."""
    real, chosen = detected(), detect()
    record.cpu_model, record.cpu_flags, record.gpu = real.cpu_model, real.recorded_flags(), real.gpu
    record.cpu_isa, record.cpu_isa_forced = chosen.level, chosen.forced
    if pipe is not None:
        record.layer_kernels = layer_kernels(pipe)
        record.step_compiled = pipe.step_fn != pipe.var.step  # compiled_step installs a function of its own


def _record(variant: str, s: Samples, preset: str, device: str, batch_size: int, probe: list[float]) -> BenchRecord:
    seconds = median(s.totals)
    return BenchRecord(
        variant=variant,
        preset=preset,
        device=device,
        batch_size=batch_size,
        runs=len(s.totals),
        seconds_per_batch=seconds,
        seconds_per_batch_all=s.totals,
        images_per_second=batch_size / seconds,
        peak_rss_bytes=s.peak_rss,
        inference_rss_bytes=s.inference_rss,
        peak_gpu_bytes=s.peak_gpu,
        stages={k: median(st.get(k, 0.0) for st in s.stages) for k in s.stages[0]},
        threads=torch.get_num_threads(),
        machine_gflops=median(probe) if probe else None,
        machine_gflops_all=probe,
    )


def add_speedups(records: list[BenchRecord], reference: str) -> None:
    ref = {r.batch_size: r for r in records if r.variant == reference}
    for r in records:
        if r.batch_size in ref:
            r.speedup_vs_baseline = ref[r.batch_size].seconds_per_batch / r.seconds_per_batch
            base_flops = ref[r.batch_size].attention_flops
            if r.attention_flops is not None and base_flops:
                r.attention_share = r.attention_flops / base_flops


@dataclass
class Contender:
    name: str
    runner: Runner
    pipe: VARPipeline | None  # None for the official code
    build_seconds: float | None = None  # applying its passes to the loaded pipeline
