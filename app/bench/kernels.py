"""`python -m app.bench kernels`: every kernel option of each compressed layer kind, side by side, on this
machine, for the layer shapes of a model; the evidence for the tables in `app.compress.hardware`.

Per layer type (one layer of each: all blocks share the shape) and row count, each option is built from the
same float32 weights as the module the service would install (so activation quantization, casts and
padding are timed too), run eager and, where it traces, under torch.compile; options are timed in turns,
`--repeats` rounds after two warm-up calls, and reported as medians. The row counts default to the rows a
linear sees at the first, middle and last scale of one image with guidance (2 x pn^2).

```bash
.venv/bin/python -m app.bench kernels                                   # d16 shapes
.venv/bin/python -m app.bench kernels --checkpoint model_store/demo --json kernels.json
VAR_CPU_ISA=avx2 .venv/bin/python -m app.bench kernels                  # what the table picks on AVX2
```
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from app.bench.runner import samples_in_turns
from app.bench.stats import median
from app.compress.hardware import COMPILABLE_INT8, bf16_native, detect, int8_kernel
from app.compress.int4 import Int4WeightLinear
from app.compress.quantize import DEFAULT_BF16, DEFAULT_INT4, DEFAULT_INT8, BF16WeightLinear, Int8Linear
from app.model.checkpoint import build_models, folder_config
from app.model.config import PRESETS, PipelineConfig
from app.model.row_stable import Linear

# option name -> (module from a float32 linear, whether torch.compile traces it)
Build = Callable[[nn.Linear], nn.Module]
MATMUL_OPTIONS: dict[str, tuple[Build, bool]] = {
    "float32": (lambda lin: lin, True),
    "bf16/native": (lambda lin: BF16WeightLinear.from_linear(lin, native=True), True),
    "bf16/float32": (lambda lin: BF16WeightLinear.from_linear(lin, native=False), True),
    "int8/fbgemm": (lambda lin: Int8Linear.from_linear(lin, "fbgemm"), False),
    "int8/int_mm": (lambda lin: Int8Linear.from_linear(lin, "int_mm"), True),
}
# AdaLN runs once per generation, outside the compiled step: eager only
ADALN_OPTIONS: dict[str, tuple[Build, bool]] = {
    "float32": (lambda lin: lin, False),
    "int4/float32": (Int4WeightLinear.from_linear, False),
}
STEP_LAYERS = ("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2", "head")
ADALN_LAYERS = ("ada_lin.1",)


@dataclass
class Timing:
    layer: str
    in_features: int
    out_features: int
    rows: int
    option: str
    mode: str  # "eager" or "compiled"
    ms: float  # median
    ms_min: float  # the least contended call: on a shared machine the better estimate of the kernel's own cost
    ms_all: list[float] = field(default_factory=list)


def layer_shapes(config: PipelineConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of the first linear of each benchmarked layer type, from the model built on meta."""
    var, _ = build_models(config, "meta")
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in var.named_modules():
        kind = next((t for t in (*STEP_LAYERS, *ADALN_LAYERS) if name == t or name.endswith("." + t)), None)
        if kind is not None and kind not in shapes and isinstance(module, nn.Linear):
            shapes[kind] = (module.in_features, module.out_features)
    return shapes


def default_rows(config: PipelineConfig) -> list[int]:
    """Rows of the first, a middle and the last scale of one image with guidance (conditional + unconditional)."""
    pn = config.var.patch_nums
    return sorted({2 * pn[0] ** 2, 2 * pn[len(pn) // 2] ** 2, 2 * pn[-1] ** 2})


def table_choice(layer: str) -> dict[str, str]:
    """What the hardware table installs for `layer` on this machine: eager (litevar, fastest-int8) and under
    compile (fastest)."""
    if layer in DEFAULT_INT8:
        kernel = int8_kernel("cpu")
        return {"eager": f"int8/{kernel}", "compiled": f"int8/{kernel}" if kernel in COMPILABLE_INT8 else "float32"}
    if layer in DEFAULT_BF16:
        if bf16_native("cpu"):
            return {"eager": "bf16/native", "compiled": "bf16/native"}
        return {"eager": "bf16/float32", "compiled": "float32"}  # upcasting per call only adds work to float32
    if layer in DEFAULT_INT4:
        return {"eager": "int4/float32", "compiled": "float32"}
    return {"eager": "float32", "compiled": "float32"}


def _callables(layer: str, lin: nn.Linear, compile_too: bool) -> dict[tuple[str, str], Callable[..., torch.Tensor]]:
    options = ADALN_OPTIONS if layer in ADALN_LAYERS else MATMUL_OPTIONS
    calls: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}
    for option, (build, compiles) in options.items():
        module = build(lin)
        calls[option, "eager"] = module
        if compile_too and compiles:
            calls[option, "compiled"] = torch.compile(module, dynamic=False)
    return calls


def time_layer(layer: str, shape: tuple[int, int], rows: int, repeats: int, compile_too: bool) -> list[Timing]:
    """Every option of `layer` at `rows` rows, timed in turns: drift of a shared machine hits them alike."""
    torch._dynamo.reset()  # each compiled module compiles afresh, within Dynamo's recompilation budget
    torch.manual_seed(0)
    lin = Linear(*shape)
    x = torch.randn(rows, shape[0])
    calls = _callables(layer, lin, compile_too)
    seconds = samples_in_turns([functools.partial(call, x) for call in calls.values()], repeats, warmups=2)
    return [
        Timing(layer, *shape, rows, option, mode, 1e3 * median(s), 1e3 * min(s), [1e3 * t for t in s])
        for (option, mode), s in zip(calls, seconds, strict=True)
    ]


def print_table(timings: list[Timing], stat: str = "median") -> None:
    options = list(dict.fromkeys(t.option for t in timings))
    print(f"{'layer':<13} {'in->out':>11} {'rows':>5}  " + " ".join(f"{o:>15}" for o in options) + "  table picks")
    groups: dict[tuple[str, int], dict[tuple[str, str], float]] = {}
    for t in timings:
        groups.setdefault((t.layer, t.rows), {})[t.option, t.mode] = t.ms if stat == "median" else t.ms_min
    for (layer, rows), ms in groups.items():
        shape = next(f"{t.in_features}->{t.out_features}" for t in timings if t.layer == layer)
        cells = []
        for o in options:
            eager, compiled = ms.get((o, "eager")), ms.get((o, "compiled"))
            cell = "-" if eager is None else f"{eager:.2f}" + ("" if compiled is None else f"/{compiled:.2f}")
            cells.append(f"{cell:>15}")
        pick = table_choice(layer)
        print(f"{layer:<13} {shape:>11} {rows:>5}  {' '.join(cells)}  {pick['eager']}, compiled {pick['compiled']}")
    print(f"(ms per call, {stat} of the repeats: eager/compiled; '-': not an option for that layer)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="d16", help="layer shapes of this preset")
    ap.add_argument("--checkpoint", type=Path, help="layer shapes of this checkpoint folder's config instead")
    ap.add_argument("--rows", help="comma-separated row counts (default: first, middle, last scale of one image)")
    ap.add_argument("--layers", help=f"comma-separated, from {','.join((*STEP_LAYERS, *ADALN_LAYERS))}")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--stat", choices=["median", "min"], default="median", help="printed statistic (JSON: both)")
    ap.add_argument("--json", type=Path, help="write the machine and the timings here")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    config = folder_config(a.checkpoint) if a.checkpoint else PRESETS[a.preset]
    shapes = layer_shapes(config)
    layers = [t for t in a.layers.split(",") if t] if a.layers else list(shapes)
    unknown = [t for t in layers if t not in shapes]
    if unknown:
        print(f"unknown layer type(s) {unknown}; known: {list(shapes)}", file=sys.stderr)
        return 2
    rows = [int(r) for r in a.rows.split(",") if r] if a.rows else default_rows(config)
    caps = detect()
    print(f"machine: {caps.describe()}; {torch.get_num_threads()} threads; shapes of {config.name}")
    timings: list[Timing] = []
    with torch.inference_mode():
        for layer in layers:
            for m in [2] if layer in ADALN_LAYERS else rows:  # AdaLN: one row per image and guidance branch
                timings += time_layer(layer, shapes[layer], m, a.repeats, not a.no_compile)
    print_table(timings, a.stat)
    if a.json:
        machine = {"cpu_model": caps.cpu_model, "isa": caps.level, "forced": caps.forced, "gpu": caps.gpu,
                   "flags": caps.recorded_flags(), "threads": torch.get_num_threads()}  # fmt: skip
        picks = {layer: table_choice(layer) for layer in layers}
        out = {"machine": machine, "model": config.name, "table": picks, "timings": [asdict(t) for t in timings]}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
