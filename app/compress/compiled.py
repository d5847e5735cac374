"""`compiled_step` and `autotuned_step`: the per-scale step and the VQVAE decoder under torch.compile.

What it buys: Inductor fuses the element-wise work between the GEMMs (LayerNorm and AdaLN modulation,
GELU, residual adds, the L2-normalised q/k; GroupNorm and SiLU in the decoder) into a few generated
kernels and removes most per-operator dispatch, which dominates a small model at batch 1. GEMMs,
convolutions and attention stay the same library kernels, so tokens match the eager pipeline (tested).

Cost: each scale is its own graph (its sequence length and cache slice differ). The first batch size
compiles one graph per scale; the second one more per scale with the batch dimension symbolic, which then
serves later batch sizes. On 2 CPU cores that is seconds per graph cold, and much less from Inductor's
on-disk cache (`TORCHINDUCTOR_CACHE_DIR`). The server's warm-up pays it before the service reports ready.

Guards: Dynamo keeps its cache of graphs on the code object of the compiled function, and by default
re-checks every module attribute and parameter at each call (about 0.5 ms per call on the demo model,
measured). Each compiled pipeline gets functions with code objects of its own, so its cache holds only its
own graphs, and the module guards are skipped. So a pass must never change a module after this one
(it runs last in every variant); a second compiled pipeline cannot pick up this one's graphs (tested).

fbgemm's packed int8 weights are opaque to the compiler: every int8 linear splits the graph (measured
0.65x of eager on the demo model), so the pass refuses a pipeline that holds them.

`autotuned_step` goes further for float32 on the CPU: the step's weights are frozen into its graphs as
constants and Inductor times, per GEMM shape, MKL against oneDNN's pre-packed linear and its own generated
C++ GEMM, keeping the fastest. At the demo model's 16 to 32 rows per scale MKL was the slowest of them in
isolation. Against `compiled` in turns on the demo model at batch 1: 0.85x to 0.89x of its time in four
runs (README). The price is compile time: minutes on 2 cores for the first batch sizes. The price in
exactness: the kernels chosen round differently from MKL's, and may differ between a graph for one batch
size and another, so tokens match the eager pipeline and an image's tokens match across batch sizes only
as far as tested (40 demo images at batch sizes 1, 2, 3, 5 and 8 ad hoc; the test model in the tests),
not by construction as with `compiled_step`.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch

from app.compress.quantize import Int8Linear
from app.model.pipeline import VARPipeline

GRAPHS_PER_SCALE = 4  # first batch size, symbolic batch, and the row-padding branch of small GEMMs


def own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` (bound) as a new function over a copy of its code object: Dynamo's cache is then its own."""
    assert isinstance(method, types.MethodType)
    f = method.__func__
    twin = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    twin.__kwdefaults__ = f.__kwdefaults__
    return types.MethodType(twin, method.__self__)


def _compile(method: Callable[..., Any]) -> Callable[..., Any]:
    guards: Callable[..., Any] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(own_code(method), options={"guard_filter_fn": guards})


def _under(settings: dict[str, Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` called under Inductor `settings`. Compile options would not do: freezing must already hold
    while Dynamo traces, which decides there whether parameters become graph constants."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(settings):
            return fn(*args, **kwargs)

    return call


def compiled_step(pipe: VARPipeline) -> VARPipeline:
    return _install(pipe, _compile)


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
    graphs = GRAPHS_PER_SCALE * len(pipe.config.var.patch_nums)
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, graphs)  # counted per code object
    # counted over the process: this pipeline's step graphs, plus a few for its decoder
    dynamo.accumulated_recompile_limit += graphs + GRAPHS_PER_SCALE
    pipe.step_fn = compile_step(pipe.var.step)
    pipe.vqvae.decoder.forward = _compile(pipe.vqvae.decoder.forward)  # type: ignore[method-assign]
    return pipe
