"""`python -m app sensitivity`: per-layer int8 sensitivity (LiteVAR's method).

One layer type at a time in W8A8, the rest float. Each row: class accuracy, FID, precision, recall and
greedy-token agreement with the float model, on the same (class, seed) list; the float model on a second seed
list gives the noise floor.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from app.compress.quantize import LAYER_TYPES, quantize_linears
from app.model.checkpoint import load_folder
from app.quality.evaluation import NOISE_FLOOR_SEED_OFFSET, EvalRun, Judge, Prompts, evaluate_variant, greedy_agreement
from app.quality.fashion_mnist import DEFAULT_DIR
from app.tools.evaluate import HEADER, print_row

FEATURES = Path("model_store/demo_classifier")  # the CLI's default judge, relative to the working directory


def study(model: Path, features: Path, per_class: int, greedy_per_class: int, batch_size: int) -> list[dict[str, Any]]:
    base = load_folder(model)
    judge = Judge.open(features, DEFAULT_DIR)
    run = EvalRun(base.config.default_sampling, batch_size, model.name)
    C = base.num_classes
    prompts, greedy = Prompts.make(C, per_class, 0), Prompts.make(C, greedy_per_class, 0)
    present = [t for t in LAYER_TYPES if any(n.endswith(t) for n, _ in base.var.named_modules())]
    records = []
    for layer_type in ["none", *present, "all"]:
        if layer_type == "none":
            pipe = base
        else:
            int8 = LAYER_TYPES if layer_type == "all" else (layer_type,)
            pipe = quantize_linears(copy.deepcopy(base), int8=int8, bf16=(), int4=())
        record, _ = evaluate_variant(f"int8:{layer_type}", pipe, prompts, run, judge, "main")
        record["greedy_agreement"] = [round(x, 4) for x in greedy_agreement(pipe, base, greedy, run.params.cfg, 50)]
        records.append(record)
        print_row(record)
    noise = Prompts.make(C, per_class, NOISE_FLOOR_SEED_OFFSET)
    records.append(evaluate_variant("int8:none", base, noise, run, judge, "noise-floor")[0])
    print_row(records[-1])
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app sensitivity", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("model_store/demo"))
    ap.add_argument("--features", type=Path, default=FEATURES, help="classifier folder whose features judge quality")
    ap.add_argument("--images-per-class", type=int, default=100)
    ap.add_argument("--greedy-per-class", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    print(HEADER)
    records = study(a.model, a.features, a.images_per_class, a.greedy_per_class, a.batch_size)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
