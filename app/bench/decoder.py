"""`python -m app.bench decoder`: the VQVAE decoder's forms side by side on this machine, the evidence for
the form `bf16_vqvae` installs (app/compress/decoder.py).

A form is a precision (float32; `bf16-autocast`: bfloat16-stored convolution weights under autocast, the
decoder before this benchmark existed; `bf16`: a bfloat16 decoder end to end; `bf16-packed`: that with its
convolution weights pre-packed for oneDNN, what `bf16_vqvae` installs on a CPU with native bfloat16; `int8`:
that with the residual and upsampling convolutions in static int8, what `int8_vqvae` installs where int8 is
native, calibrated on other latents than those timed), a compilation (eager, torch.compile, torch.compile
with frozen weights; not for `bf16-packed` and `int8`) and a batching
(one image at a time, as the CPU service decodes for batch invariance, or the whole batch in one call).

Every form decodes the same latents from the same weights; forms are timed in turns, `--runs` rounds after
one warm-up call (which compiles: the int8 form's quantization kernels too), and reported as medians of wall
time and of the process's CPU time (the steadier of the two on a shared machine; with several threads it also
counts their waits, `--threads 1` gives the cleanest measure of the work). Per form: the pixel difference
(images in [0, 1]) from float32 eager, and for batched forms whether the first and last image of a batch
equal, bitwise, the same image decoded alone.

```bash
.venv/bin/python -m app.bench decoder                                    # d16 VQVAE, random weights
.venv/bin/python -m app.bench decoder --checkpoint model_store/demo --batch-sizes 1,8 --json decoder.json
```
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch

from app.bench.runner import bench_labels
from app.bench.stats import median
from app.compress.compiled import configure_dynamo, own_code
from app.compress.decoder import native_bf16_decoder, prepack_decoder, store_convs_in_bf16
from app.compress.hardware import detect
from app.compress.int8_decoder import calibration_latents, convert_decoder
from app.model.checkpoint import load_folder
from app.model.config import PRESETS
from app.model.pipeline import DecoderFn
from app.model.vqvae import VQVAE

Precision = Literal["float32", "bf16-autocast", "bf16", "bf16-packed", "int8"]
Compilation = Literal["eager", "compiled", "frozen"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
COMPILATIONS: tuple[Compilation, ...] = get_args(Compilation)
DEFAULT_FORMS = "float32,bf16-autocast,bf16,bf16-packed,int8,float32/compiled,bf16/compiled,bf16/frozen"
PACKED: tuple[Precision, ...] = ("bf16-packed", "int8")  # oneDNN's packed weights: eager only
CALIBRATION_IMAGES = 4  # latents the int8 form is calibrated on, apart from those it decodes
Decode = Callable[[torch.Tensor], torch.Tensor]  # latents (B, Cvae, h, w) -> images in [0, 1]


@dataclass(frozen=True)
class Form:
    precision: Precision
    compilation: Compilation
    per_image: bool

    @property
    def name(self) -> str:
        compiled = "" if self.compilation == "eager" else f"/{self.compilation}"
        return f"{self.precision}{compiled}/{'per-image' if self.per_image else 'batched'}"


@dataclass
class Timing:
    form: str
    batch_size: int
    seconds: float  # median wall time per batch
    cpu_seconds: float  # median process CPU time per batch (all threads)
    first_call_seconds: float  # the warm-up call: compilation included
    max_pixel_diff: float  # against float32 eager, images in [0, 1]
    mean_pixel_diff: float
    batch_invariant: bool | None  # batched forms: first and last image equal to themselves decoded alone
    seconds_all: list[float] = field(default_factory=list)
    cpu_seconds_all: list[float] = field(default_factory=list)


def parse_forms(text: str) -> list[tuple[Precision, Compilation]]:
    """`precision[/compilation]`, comma-separated, e.g. `float32,bf16/frozen`."""
    forms: list[tuple[Precision, Compilation]] = []
    for item in filter(None, text.split(",")):
        precision, _, compilation = item.partition("/")
        compilation = compilation or "eager"
        if precision not in PRECISIONS or compilation not in COMPILATIONS:
            raise ValueError(f"unknown form {item!r}: precision from {PRECISIONS}, compilation from {COMPILATIONS}")
        if precision in PACKED and compilation != "eager":
            raise ValueError(f"{item}: oneDNN's packed weights are opaque to torch.compile, {precision} runs eager")
        forms.append((cast(Precision, precision), cast(Compilation, compilation)))
    return forms


def vqvae_in(precision: Precision, base: VQVAE, calibration: torch.Tensor) -> VQVAE:
    """`base` (float32, channels-last) as stored by a precision: a copy for the others. `int8`: bf16-packed
    with the convolutions `int8_vqvae` converts in int8, calibrated on decoding `calibration`."""
    if precision == "float32":
        return base
    vqvae = copy.deepcopy(base)
    store_convs_in_bf16(vqvae)
    if precision in ("bf16", *PACKED):
        native_bf16_decoder(vqvae)
    if precision in PACKED:
        prepack_decoder(vqvae)
    if precision == "int8":
        with torch.inference_mode():
            convert_decoder(vqvae, calibration)  # every convolution, whatever its size: min_macs=0
    return vqvae


def compiled_decoder(vqvae: VQVAE, compilation: Compilation) -> DecoderFn:
    """The decoder hook of a compilation: the module itself, or its forward under torch.compile as
    `compiled_step` compiles it, `frozen`: with the weights folded into the graph as constants (Inductor then
    pre-packs oneDNN's convolution weights)."""
    if compilation == "eager":
        return vqvae.decoder
    configure_dynamo()
    guards: Callable[..., Any] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    compiled = torch.compile(own_code(vqvae.decoder.forward), options={"guard_filter_fn": guards})
    if compilation == "compiled":
        return cast(DecoderFn, compiled)

    def frozen(x: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):  # it must hold while Dynamo traces
            return cast(torch.Tensor, compiled(x))

    return frozen


def decode_fn(form: Form, vqvae: VQVAE) -> Decode:
    """What `VARPipeline.decode` runs for this form (a compiled hook of its own: one Dynamo cache per form)."""
    hook = compiled_decoder(vqvae, form.compilation)
    autocast = form.precision == "bf16-autocast"

    def decode(f_hat: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            img = vqvae.fhat_to_img(f_hat, hook, per_image=form.per_image)
        return img.float().add_(1).mul_(0.5)

    return decode


def latents(a: argparse.Namespace, batch: int) -> tuple[VQVAE, torch.Tensor, torch.Tensor, str]:
    """The VQVAE (float32, channels-last), `batch` latents to decode, CALIBRATION_IMAGES other latents for the
    int8 form, and the model's name. A checkpoint's latents are generated by its own pipeline (calibration:
    as `int8_vqvae` generates them); random weights decode random tokens of every scale."""
    if a.checkpoint:
        pipe = load_folder(a.checkpoint)
        labels = bench_labels(batch, pipe.num_classes)
        f_hat = pipe.generate(labels, seeds=list(range(batch))).f_hat
        return pipe.vqvae, f_hat, calibration_latents(pipe, CALIBRATION_IMAGES), pipe.config.name
    config = PRESETS[a.preset]
    torch.manual_seed(0)
    vqvae = VQVAE(config.vqvae).eval().use_channels_last()

    def random_latents(n: int) -> torch.Tensor:
        tokens = [torch.randint(config.vqvae.vocab_size, (n, pn * pn)) for pn in config.vqvae.patch_nums]
        return vqvae.quantize.idxBl_to_fhat(tokens)

    return vqvae, random_latents(batch), random_latents(CALIBRATION_IMAGES), config.name


def timed(fn: Decode, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(x)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def invariant(fn: Decode, f_hat: torch.Tensor, batch_out: torch.Tensor) -> bool:
    """Whether the first and last image of the batch equal, bitwise, the same latent decoded alone."""
    rows = sorted({0, f_hat.shape[0] - 1})
    return all(torch.equal(fn(f_hat[i : i + 1])[0], batch_out[i]) for i in rows)


def measure(forms: list[Form], vqvaes: dict[Precision, VQVAE], f_hat: torch.Tensor, runs: int) -> list[Timing]:
    """Warm each form up (compiling), check it against float32 eager, then time the forms in turns."""
    batch = f_hat.shape[0]
    reference = decode_fn(Form("float32", "eager", True), vqvaes["float32"])(f_hat)
    fns = {form: decode_fn(form, vqvaes[form.precision]) for form in forms}
    timings: dict[Form, Timing] = {}
    for form, fn in fns.items():
        out, first, _ = timed(fn, f_hat)
        diff = (out - reference).abs()
        checked = None if form.per_image or batch == 1 else invariant(fn, f_hat, out)
        timings[form] = Timing(form.name, batch, 0.0, 0.0, first, diff.max().item(), diff.mean().item(), checked)
    for _ in range(runs):
        for form, fn in fns.items():
            _, wall, cpu = timed(fn, f_hat)
            timings[form].seconds_all.append(wall)
            timings[form].cpu_seconds_all.append(cpu)
    for t in timings.values():
        t.seconds, t.cpu_seconds = median(t.seconds_all), median(t.cpu_seconds_all)
    return list(timings.values())


def print_table(timings: list[Timing]) -> None:
    print(f"{'form':<28} {'batch':>5} {'s/batch':>8} {'cpu s':>8} {'vs f32':>7} {'first s':>8} "
          f"{'max diff':>9} {'mean diff':>9} {'invariant':>9}")  # fmt: skip
    reference = {t.batch_size: t.seconds for t in timings if t.form == "float32/per-image"}
    for t in timings:
        speedup = f"{reference[t.batch_size] / t.seconds:>6.2f}x" if t.batch_size in reference else f"{'-':>7}"
        inv = "-" if t.batch_invariant is None else ("yes" if t.batch_invariant else "NO")
        print(
            f"{t.form:<28} {t.batch_size:>5} {t.seconds:>8.3f} {t.cpu_seconds:>8.3f} {speedup} "
            f"{t.first_call_seconds:>8.1f} {t.max_pixel_diff:>9.5f} {t.mean_pixel_diff:>9.6f} {inv:>9}"
        )
    print("(medians; vs f32: float32 eager one image at a time, the same batch size; diff: pixels in [0, 1]")
    print(" against float32 eager; invariant: batched forms only, first and last image equal to them decoded alone)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench decoder", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="d16", help="VQVAE shape (random weights)")
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint folder's VQVAE and generated latents instead")
    ap.add_argument("--forms", default=DEFAULT_FORMS, help="comma-separated precision[/compilation]")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--batching", choices=("both", "per-image", "batched"), default="both",
                    help="at batch sizes above 1 (batch 1 is always one call)")  # fmt: skip
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write the machine and the timings here")
    a = ap.parse_args(argv)
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    try:
        a.forms = parse_forms(a.forms)
    except ValueError as e:
        ap.error(str(e))
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b]
    return a


def forms_at(a: argparse.Namespace, batch: int) -> list[Form]:
    batchings = [True] if batch == 1 else {"both": [True, False], "per-image": [True], "batched": [False]}[a.batching]
    return [Form(p, c, per_image) for p, c in a.forms for per_image in batchings]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base, f_all, calibration, model = latents(a, max(a.batch_sizes))
    vqvaes = {p: vqvae_in(p, base, calibration) for p in {"float32", *(p for p, _ in a.forms)}}
    caps = detect()
    print(f"machine: {caps.describe()}; {torch.get_num_threads()} threads; decoder of {model}")
    timings: list[Timing] = []
    with torch.inference_mode():
        for batch in a.batch_sizes:
            timings += measure(forms_at(a, batch), vqvaes, f_all[:batch].contiguous(), a.runs)
    print_table(timings)
    if a.json:
        machine = {"cpu_model": caps.cpu_model, "isa": caps.level, "forced": caps.forced, "gpu": caps.gpu,
                   "flags": caps.recorded_flags(), "threads": torch.get_num_threads()}  # fmt: skip
        out = {"machine": machine, "model": model, "timings": [asdict(t) for t in timings]}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
