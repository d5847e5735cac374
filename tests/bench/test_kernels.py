"""`python -m app.bench kernels`: every option of every layer kind timed, and the table's pick beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench.kernels import ADALN_OPTIONS, MATMUL_OPTIONS, default_rows, layer_shapes, main
from app.model.checkpoint import random_pipeline
from app.model.config import PRESETS


def test_layer_shapes_are_the_models_own() -> None:
    config = PRESETS["tiny"]
    var = random_pipeline(config).var
    shapes = layer_shapes(config)
    assert set(shapes) == {"attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2", "ada_lin.1", "head"}
    block = var.blocks[0]
    assert shapes["ffn.fc2"] == (block.ffn.fc2.in_features, block.ffn.fc2.out_features)
    assert shapes["head"] == (var.head.in_features, var.head.out_features)
    pn = config.var.patch_nums
    assert default_rows(config) == sorted({2 * pn[0] ** 2, 2 * pn[len(pn) // 2] ** 2, 2 * pn[-1] ** 2})


def test_every_option_is_timed_and_the_forced_tables_pick_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", "avx2")
    out = tmp_path / "kernels.json"
    args = ["--preset", "tiny", "--rows", "3,20", "--repeats", "2", "--no-compile", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["isa"] == "avx2" and result["machine"]["forced"]
    timed = {(t["layer"], t["rows"], t["option"]) for t in result["timings"] if t["ms"] > 0 and len(t["ms_all"]) == 2}
    matmuls = {
        (layer, rows, o) for layer in ("attn.mat_qkv", "ffn.fc2", "head") for rows in (3, 20) for o in MATMUL_OPTIONS
    }
    assert matmuls <= timed and {("ada_lin.1", 2, o) for o in ADALN_OPTIONS} <= timed
    assert {t["mode"] for t in result["timings"]} == {"eager"}
    assert result["table"]["ffn.fc1"] == {"eager": "int8/fbgemm", "compiled": "float32"}
    assert result["table"]["ffn.fc2"] == {"eager": "bf16/float32", "compiled": "float32"}
    assert "int8/fbgemm, compiled float32" in capsys.readouterr().out


@pytest.mark.compile
def test_compiled_timings_only_for_options_that_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", "amx")
    out = tmp_path / "kernels.json"
    assert main(["--preset", "tiny", "--layers", "ffn.fc1", "--rows", "8", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    compiled = {t["option"] for t in result["timings"] if t["mode"] == "compiled"}
    assert compiled == {o for o, (_, traces) in MATMUL_OPTIONS.items() if traces} and "int8/fbgemm" not in compiled
    assert result["table"]["ffn.fc1"] == {"eager": "int8/int_mm", "compiled": "int8/int_mm"}


def test_an_unknown_layer_type_is_refused() -> None:
    assert main(["--preset", "tiny", "--layers", "ffn.fc3"]) == 2
