"""`compiled_step`, `compiled_where_faster` and `autotuned_step`: the per-scale step and the VQVAE decoder under
torch.compile.

What it buys: Inductor fuses the element-wise work between the GEMMs (LayerNorm and AdaLN modulation,
GELU, residual adds, the L2-normalised q/k; GroupNorm and SiLU in the decoder) into a few generated
kernels and removes most per-operator dispatch, which dominates a small model at batch 1. GEMMs,
convolutions and attention stay the same library kernels, so tokens match the eager pipeline (tested). With
int8 layers the quantization of their inputs fuses too, and a fused kernel's rounding can move an activation
across an int8 rounding step: tokens then match as far as tested and measured (docs/benchmarks.md, "litevar
compiled").

Cost: each scale is its own graph (its sequence length and cache slice differ). The first batch size
compiles one graph per scale; the second one more per scale with the batch dimension symbolic, which then
serves later batch sizes. On 2 CPU cores that is seconds per graph cold, and much less from Inductor's
on-disk cache (`TORCHINDUCTOR_CACHE_DIR`). The server's warm-up pays it before the variant serves, at the
batch sizes that get graphs of their own (`graph_batch_sizes`).

The compiled functions go into the pipeline's hooks (`step_fn`, `decoder_fn`); modules are left as they are.

Guards: Dynamo keeps its cache of graphs on the code object of the compiled function, and by default
re-checks every module attribute and parameter at each call (a cost measurable on the demo model:
docs/benchmarks.md, "Compiled and autotuned, one image"). Each compiled pipeline gets functions with code
objects of its own, so its cache holds only its
own graphs, and the module guards are skipped. So a pass must never change a module after this one
(it runs last in every variant); a second compiled pipeline cannot pick up this one's graphs (tested).

fbgemm's packed int8 weights are opaque to the compiler: every int8 linear splits the graph (slower than
eager on the demo model, same section), so the pass refuses a pipeline that holds them. `compiled_where_faster`
(litevar's) compiles only where the hardware table says a step with int8 layers runs faster compiled, which is
where they run on torch._int_mm, and leaves the pipeline eager elsewhere.

`autotuned_step` goes further for float32 on the CPU: the step's weights are frozen into its graphs as
constants and Inductor times, per GEMM shape, MKL against oneDNN's pre-packed linear and its own generated
C++ GEMM, keeping the fastest. At the demo model's 16 to 32 rows per scale MKL was the slowest of them in
isolation; against `compiled` on the demo model at batch 1 see docs/benchmarks.md. The price is compile
time: minutes on 2 cores for the first batch sizes. The price in exactness: the kernels chosen round
differently from MKL's, and may differ between a graph for one batch size and another, so tokens match the
eager pipeline and an image's tokens match across batch sizes only as far as tested (the test model, in
tests/compress/test_compiled.py), not by construction as with `compiled_step`.
"""

from __future__ import annotations

import functools
import logging
import sysconfig
import threading
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from app.compress.decoder import is_prepacked
from app.compress.hardware import compiled_faster
from app.compress.quantize import Int8Linear
from app.model.kv_cache import ScaleStep
from app.model.pipeline import VARPipeline
from app.model.row_stable import MIN_ROWS

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

GRAPHS_PER_SCALE = 4  # first batch size, symbolic batch, and the row-padding branch of small GEMMs
# Dynamo's recompilation budgets are process-wide; `configure_dynamo` sets them once, to fixed values.
# Per code object: each compiled pipeline has its own step code object (see `own_code`), which compiles up
# to GRAPHS_PER_SCALE graphs per scale; MAX_SCALES covers every preset (10 scales) with room for more.
MAX_SCALES = 16
RECOMPILE_LIMIT = GRAPHS_PER_SCALE * MAX_SCALES
# Over the process: a server compiles one pipeline per compiled variant (three exist), a test process a few
# more; each holds its step graphs and a few decoder graphs. Room for 16 such pipelines of the most scales;
# a recompilation that runs away (a guard failing at every call) still stops at a bounded count.
COMPILED_PIPELINES = 16
ACCUMULATED_RECOMPILE_LIMIT = COMPILED_PIPELINES * GRAPHS_PER_SCALE * (MAX_SCALES + 1)


def graph_batch_sizes(max_batch_size: int, steps: Sequence[ScaleStep]) -> list[int]:
    """The batch sizes up to `max_batch_size` at which a compiled step on the CPU compiles graphs of its own,
    smallest first, for a pipeline of these `steps` (`VARPipeline.steps`); running these once compiles every
    graph that the other sizes then reuse. A size gets new graphs when it differs from every smaller one in
    what the graphs are specialised on: batch 1 (Dynamo specialises a dimension of size 1), batch 2 (the
    second size seen turns the batch dimension symbolic), and, per scale, whether the rows of its linear
    layers (two per image where guided, one where not) reach `MIN_ROWS`: the row-stable linear's branch
    (app/model/row_stable.py), a guard on the symbolic size."""

    def specialised_on(batch: int) -> tuple[int, tuple[bool, ...]]:
        rows = ((2 if step.guided else 1) * batch * step.num_tokens for step in steps)
        return min(batch, 2), tuple(r >= MIN_ROWS for r in rows)

    first: dict[tuple[int, tuple[bool, ...]], int] = {}
    for batch in range(1, max_batch_size + 1):
        first.setdefault(specialised_on(batch), batch)
    return sorted(first.values())


def own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` (bound) as a new function over a copy of its code object: Dynamo's cache is then its own."""
    assert isinstance(method, types.MethodType)
    f = method.__func__
    twin = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    twin.__kwdefaults__ = f.__kwdefaults__
    return types.MethodType(twin, method.__self__)


_dynamo_configured = threading.local()


def configure_dynamo() -> None:
    """Set Dynamo's recompilation budgets for this thread, once. Dynamo's settings are per thread (a value set
    in one thread reads as the default in the others), and a compiled function compiles in the thread that
    calls it (the engine's worker, a warm-up thread), so every compiled function sets them where it runs
    (`with_dynamo_budgets`): with the default budget of 8, a step compiled at batch sizes 1, 2 and 8 ran its
    last shapes eagerly once served."""
    if getattr(_dynamo_configured, "done", False):
        return
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT  # counted per code object
    torch._dynamo.config.accumulated_recompile_limit = ACCUMULATED_RECOMPILE_LIMIT  # counted over the process
    _dynamo_configured.done = True


def with_dynamo_budgets(compiled: Callable[P, T]) -> Callable[P, T]:
    """`compiled` (a torch.compile'd function), which sets Dynamo's budgets in the calling thread first."""

    @functools.wraps(compiled)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        configure_dynamo()
        return compiled(*args, **kwargs)

    return call


def _compile(method: Callable[..., Any]) -> Callable[..., Any]:
    guards: Callable[..., Any] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return with_dynamo_budgets(torch.compile(own_code(method), options={"guard_filter_fn": guards}))


def _under(settings: dict[str, Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` called under Inductor `settings`. Compile options would not do: freezing must already hold
    while Dynamo traces, which decides there whether parameters become graph constants."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(settings):
            return fn(*args, **kwargs)

    return call


def compiled_step(pipe: VARPipeline) -> VARPipeline:
    """The per-scale step and the VQVAE decoder under torch.compile (Inductor), weights unchanged."""
    return _install(pipe, _compile)


def cpu_compiler_missing() -> str | None:
    """What Inductor's CPU code needs to build and this machine lacks (a C++ compiler, Python's headers), else
    None. Without them a compiled step fails at its first call."""
    try:
        torch._inductor.cpp_builder.get_cpp_compiler()
    except Exception:  # Inductor raises its own error types when the search finds none
        return f"a C++ compiler (one of {torch._inductor.config.cpp.cxx})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's headers (Python.h)"
    return None


def compiles_where_faster(device: torch.device) -> bool:
    """Whether `compiled_where_faster` compiles on `device`: where the hardware table says a step that keeps int8
    layers runs faster compiled (`compiled_faster`) and, on the CPU, the machine can build the compiled code."""
    return compiled_faster(device) and (device.type != "cpu" or cpu_compiler_missing() is None)


def compiled_where_faster(pipe: VARPipeline) -> VARPipeline:
    """`compiled_step` where the hardware table says a step with int8 layers runs faster compiled
    (`compiled_faster`: torch._int_mm's CPUs and CUDA); elsewhere (fbgemm's CPUs) the pipeline as it is, eager.
    Eager too, with a warning, on a CPU that lacks what compiling needs: slower, but serving."""
    if not compiled_faster(pipe.device):
        return pipe
    missing = cpu_compiler_missing() if pipe.device.type == "cpu" else None
    if missing:
        log.warning("the step stays eager: compiling it would be faster here, but this machine lacks %s", missing)
        return pipe
    return compiled_step(pipe)


def autotuned_step(pipe: VARPipeline) -> VARPipeline:
    """The step autotuned; the decoder as in `compiled_step` (it has no GEMMs to tune)."""
    backends = "CPP,ATEN" if pipe.device.type == "cpu" else "TRITON,ATEN"
    settings = {
        "freezing": True,
        "max_autotune": True,
        "max_autotune_gemm_backends": backends,
        "autotune_num_choices_displayed": 0,  # its tables go to stderr, into the server's log, otherwise
        "max_autotune_report_choices_stats": False,
    }
    return _install(pipe, lambda method: _under(settings, _compile(method)))


def _install(pipe: VARPipeline, compile_step: Callable[[Callable[..., Any]], Callable[..., Any]]) -> VARPipeline:
    packed = [n for n, m in pipe.var.named_modules() if isinstance(m, Int8Linear) and m.packed_bytes]
    if packed:
        raise ValueError(f"compiling cannot trace fbgemm's packed int8 layers ({len(packed)}, e.g. {packed[0]})")
    scales = len(pipe.config.var.patch_nums)
    if scales > MAX_SCALES:
        raise ValueError(f"compiling budgets graphs for at most {MAX_SCALES} scales, the model has {scales}")
    configure_dynamo()
    pipe.step_fn = compile_step(pipe.var.step)
    # the pipeline's hook, not the module: the VQVAE stays as loaded, and a shared one is never a compiled one.
    # A decoder bf16_vqvae pre-packed for oneDNN stays eager: its packed weights are opaque to the compiler,
    # and the eager bf16 decoder measured faster than the compiled one (app/compress/decoder.py).
    if not is_prepacked(pipe.vqvae.decoder):
        pipe.decoder_fn = _compile(pipe.vqvae.decoder.forward)
    return pipe
