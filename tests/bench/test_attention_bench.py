"""`python -m app.bench attention` and the offline benchmark's `--window-plan`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench import attention, offline
from app.bench.__main__ import main as bench_main
from app.compress.windows import band_plan
from app.model.config import PRESETS
from tests.conftest import DEMO


def test_the_attention_bench_times_both_routes_and_checks_the_sparse_one(tmp_path: Path) -> None:
    """The demo's shape: scale 6 (64 queries) on the key tiles, scales 3-5 masked; every route's output equals
    the masked dense computation."""
    out = tmp_path / "attention.json"
    args = ["attention", "--checkpoint", str(DEMO), "--keep", "0.3", "--batch-size", "1,2", "--repeats", "1"]
    assert bench_main([*args, "--min-queries", "64", "--min-skipped", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    timings = report["timings"]
    assert [(t["batch_size"], t["scale"]) for t in timings] == [(b, s) for b in (1, 2) for s in (3, 4, 5, 6)]
    assert [t["route"] for t in timings if t["batch_size"] == 1] == ["masked"] * 3 + ["sparse tiles"]
    for t in timings:
        assert t["rows"] == 2 * t["batch_size"]  # guidance doubles the rows
        assert t["dense_s"] > 0 and t["route_s"] > 0 and t["ratio"] == pytest.approx(t["route_s"] / t["dense_s"])
        assert t["max_abs_diff"] < 1e-5
        assert 0 < t["kept_share"] <= t["computed_share"] <= 1
    sparse = next(t for t in timings if t["route"] == "sparse tiles")
    assert sparse["computed_share"] < 1  # the tiles skip pairs
    totals = report["totals"]["1"]
    assert totals["route_s"] == pytest.approx(sum(t["route_s"] for t in timings if t["batch_size"] == 1))
    assert totals["kept_share"] == pytest.approx(0.3, abs=0.01)


def test_the_attention_bench_refuses_a_plan_for_another_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_file = tmp_path / "d16.safetensors"
    d16 = PRESETS["d16"].var
    band_plan(d16.depth, d16.num_heads, d16.patch_nums, 0.15).save(plan_file)
    assert attention.main(["--checkpoint", str(DEMO), "--plan", str(plan_file), "--repeats", "1"]) == 2
    assert "depth 16" in capsys.readouterr().err


def test_the_offline_bench_runs_windowed_variants_on_the_given_plan(tmp_path: Path) -> None:
    """tiny has d16's sequence lengths: with a 15% band plan its windowed variant computes far less attention
    than the baseline (a plan calibrated on its random weights keeps nearly everything)."""
    tiny = PRESETS["tiny"].var
    plan_file, out = tmp_path / "band.safetensors", tmp_path / "bench.json"
    band_plan(tiny.depth, tiny.num_heads, tiny.patch_nums, 0.15).save(plan_file)
    args = ["--preset", "tiny", "--variants", "baseline,windows", "--batch-sizes", "1", "--runs", "1"]
    assert offline.main([*args, "--window-plan", str(plan_file), "--json", str(out)]) == 0
    base, windows = json.loads(out.read_text())
    assert windows["attention_share"] < 0.6 < base["attention_share"] == 1


def test_the_offline_bench_refuses_a_window_plan_for_another_model(tmp_path: Path) -> None:
    plan_file = tmp_path / "d16.safetensors"
    d16 = PRESETS["d16"].var
    band_plan(d16.depth, d16.num_heads, d16.patch_nums, 0.15).save(plan_file)
    args = ["--preset", "tiny", "--variants", "windows", "--batch-sizes", "1", "--runs", "1"]
    with pytest.raises(SystemExit, match=r"--window-plan .*depth 16, 16 heads.* the model has depth 2"):
        offline.main([*args, "--window-plan", str(plan_file)])
    with pytest.raises(SystemExit, match="not a window plan"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk")
        offline.main([*args, "--window-plan", str(tmp_path / "junk.safetensors")])
