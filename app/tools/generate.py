"""`python -m app generate`: generate images from the command line and show where the time went."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from app.compress import VARIANTS, apply_variant, variant_spec
from app.compress.plans import plans_for
from app.model.checkpoint import open_pipeline
from app.model.config import PRESETS
from app.model.images import nonfinite_images
from app.model.timing import Stage, StageTimer
from app.tools.images import save_grid


def add_model_args(ap: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    ap.add_argument("--checkpoint", type=Path, help="checkpoint folder (released var_d*.pth + vae_*.pth, or ours)")
    ap.add_argument("--preset", choices=list(PRESETS), default=default_preset, help="model shape for --random-init")
    ap.add_argument("--random-init", action="store_true", help="random weights: shape-only runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")


class NonFiniteOutput(RuntimeError):
    """Generated pixels that are NaN or infinite: the checkpoint's weights (or a variant's passes) are broken,
    and a PNG of them would show made-up pixels as if they were an image (the server answers 500 for them)."""


def generate_command(a: argparse.Namespace) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    pipe = open_pipeline(a.checkpoint, a.preset, a.random_init).to(a.device)
    pipe = apply_variant(a.variant, pipe, plans=plans_for(pipe, a.checkpoint, [variant_spec(a.variant)]))
    load_s = time.perf_counter() - t0
    # the model's own sampling settings, as the server and the benchmark use; flags override them
    params = pipe.config.default_sampling.overridden(a.cfg, a.top_k, a.top_p)
    params = dataclasses.replace(params, more_smooth=params.more_smooth or a.more_smooth)
    labels = [a.class_label] * a.num_images
    seeds = [a.seed + i for i in range(a.num_images)]
    timer = StageTimer(pipe.device)
    t0 = time.perf_counter()
    gen = pipe.generate(labels, params, seeds=seeds, timer=timer)
    total_s = time.perf_counter() - t0
    if bad := nonfinite_images(gen.images):
        raise NonFiniteOutput(
            f"generation produced non-finite output (NaN or infinite pixels) in {len(bad)} of {a.num_images} "
            f"image(s) (seeds {', '.join(str(seeds[i]) for i in bad)}), variant {a.variant!r}; {a.out} not "
            "written. Broken weights are the usual cause"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(gen.images, min(a.num_images, 8), a.out)
    print(f"wrote {a.out} ({a.num_images} image(s), class {a.class_label}, seeds {seeds[0]}..{seeds[-1]})")
    print(f"model load + variant {a.variant!r}: {load_s:.2f} s on {pipe.device}")
    print(f"generation: {total_s:.3f} s")
    print(f"  {Stage.TRANSFORMER} {timer.stage_seconds()[Stage.TRANSFORMER]:.3f} s")
    for k, v in timer.seconds.items():
        print(f"    {k:<22} {v:.3f} s" if k.startswith(Stage.TRANSFORMER) else f"  {k:<24} {v:.3f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    g = argparse.ArgumentParser(prog="python -m app generate", description=__doc__.splitlines()[0])
    add_model_args(g)
    g.add_argument("--class", dest="class_label", type=int, required=True)
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--cfg", type=float, help="sampling overrides (default: the model's own settings)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--more-smooth", action="store_true")
    g.add_argument("--variant", choices=list(VARIANTS), default="baseline")
    g.add_argument("--out", type=Path, default=Path("out.png"))
    a = g.parse_args(argv)
    try:
        return generate_command(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteOutput as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
