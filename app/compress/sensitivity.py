"""Per-layer int8 sensitivity on a model (LiteVAR's method): one layer type at a time in W8A8, the rest float.

Each row: class accuracy, FID, precision, recall and greedy-token agreement with the float model, on the
same (class, seed) list; the float model on a second seed list gives the noise floor.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from app.compress.quantize import LAYER_TYPES, quantize_linears
from app.evaluate import NOISE_FLOOR_SEED_OFFSET, evaluate_variant, load_reference, print_row
from app.fashion_mnist import DEFAULT_DIR
from app.model.checkpoint import load_folder
from app.quality.evaluation import Prompts, greedy_agreement, open_feature_network

FEATURES = Path("model_store/demo_classifier")


def study(model: Path, per_class: int, greedy_per_class: int, batch_size: int) -> list[dict[str, Any]]:
    base = load_folder(model)
    features = open_feature_network(FEATURES)
    _, reference = features(load_reference(DEFAULT_DIR))
    a = argparse.Namespace(params=base.config.default_sampling, batch_size=batch_size, label=model.name)
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
        record, _ = evaluate_variant(f"int8:{layer_type}", pipe, prompts, a, features, reference, "main")
        record["greedy_agreement"] = [round(x, 4) for x in greedy_agreement(pipe, base, greedy, a.params.cfg, 50)]
        records.append(record)
        print_row(record)
    noise = Prompts.make(C, per_class, NOISE_FLOOR_SEED_OFFSET)
    records.append(evaluate_variant("int8:none", base, noise, a, features, reference, "noise-floor")[0])
    print_row(records[-1])
    return records
