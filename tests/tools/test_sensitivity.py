"""`python -m app sensitivity`: a row per layer type in int8, the float model's row and its noise floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.__main__ import main
from tests.conftest import DEMO, DEMO_CLASSIFIER

pytestmark = [pytest.mark.slow, pytest.mark.data]


def test_the_sensitivity_study_has_a_row_per_layer_type_and_a_noise_floor(tmp_path: Path) -> None:
    out = tmp_path / "sens.json"
    args = ["sensitivity", "--model", str(DEMO), "--features", str(DEMO_CLASSIFIER)]
    args += ["--images-per-class", "1", "--greedy-per-class", "1", "--json", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())
    variants = [r["variant"] for r in rows if r["seed_set"] == "main"]
    assert variants[0] == "int8:none" and variants[-1] == "int8:all"
    assert {"int8:attn.mat_qkv", "int8:ffn.fc2", "int8:head", "int8:word_embed"} <= set(variants)
    int8_all = next(r for r in rows if r["variant"] == "int8:all")
    assert min(int8_all["greedy_agreement"]) < 1.0  # int8 everywhere changes some greedy token
    assert rows[-1]["seed_set"] == "noise-floor"
