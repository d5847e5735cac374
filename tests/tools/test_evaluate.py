"""`python -m app evaluate` on the shipped demo model, a few images per class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.bench import plots
from app.quality.evaluation import image_metrics, load_reference, open_feature_network
from app.tools import evaluate

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
@pytest.mark.data
def test_evaluation_writes_records_grids_and_the_noise_floor(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    argv = ["--model", str(ROOT / "model_store" / "demo"), "--features", str(ROOT / "model_store" / "demo_classifier")]
    argv += ["--images-per-class", "4", "--greedy-per-class", "1", "--json", str(out), "--out-dir", str(tmp_path)]
    assert evaluate.main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["variant"], r["seed_set"]) for r in records] == [("baseline", "main"), ("baseline", "noise-floor")]
    for r in records:
        assert r["images"] == 40
        assert 0.0 <= r["class_accuracy"] <= 1.0 and r["fid"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert records[0]["class_accuracy"] >= 0.7
    assert (tmp_path / "demo_baseline.png").is_file()


def test_unknown_variant_is_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    assert evaluate.main(["--variants", "baseline,nope"]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err


def test_any_feature_network_and_reference_file_can_be_given(tmp_path: Path) -> None:
    """An exported feature network (no class accuracy then) and reference images in a safetensors file."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 8))
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(net, (torch.zeros(4, 1, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "f.pt2")
    images = (torch.arange(20 * 32 * 32) % 251).to(torch.uint8).reshape(20, 1, 32, 32)
    save_file({"images": images}, str(tmp_path / "ref.safetensors"))
    reference = load_reference(tmp_path / "ref.safetensors")
    assert reference.shape == (20, 1, 32, 32) and reference.min() >= -1 and reference.max() <= 1
    features = open_feature_network(tmp_path / "f.pt2")
    _, ref_feats = features(reference)
    metrics = image_metrics(reference[:10].add(1).div(2), [0] * 10, features, ref_feats)
    assert metrics["class_accuracy"] is None and metrics["fid"] > 0


@pytest.mark.slow
@pytest.mark.data
def test_compressed_variants_are_judged_on_the_same_prompts_and_plotted(tmp_path: Path) -> None:
    out, png = tmp_path / "eval.json", tmp_path / "quality.png"
    argv = ["--model", str(ROOT / "model_store" / "demo"), "--variants", "baseline,litevar", "--images-per-class", "2"]
    argv += ["--features", str(ROOT / "model_store" / "demo_classifier")]
    argv += ["--greedy-per-class", "1", "--json", str(out), "--out-dir", str(tmp_path), "--plot", str(png)]
    assert evaluate.main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["variant"], r["images"]) for r in records] == [("baseline", 20), ("litevar", 20), ("baseline", 20)]
    agreement = records[1]["greedy_agreement"]
    assert agreement[0] == 1.0  # the first scale's token is the class's, even in int8
    assert min(agreement) < 1.0  # and litevar is not the baseline: some greedy token changes
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"variant": v, "batch_size": 8, "images_per_second": s} for v, s in
                                 (("baseline", 30.0), ("litevar", 45.0))]))  # fmt: skip
    assert plots.main([str(out), str(bench), str(tmp_path / "vs_bench.png")]) == 0
    for p in (png, tmp_path / "vs_bench.png"):
        assert p.read_bytes()[:4] == b"\x89PNG"
