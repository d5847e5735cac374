"""`python -m app evaluate`: on a random demo-shaped model with tiny judges (fast), and on the shipped demo model,
a few images per class."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.bench import plots
from app.compress.calibrate import calibrate_sharing
from app.compress.sharing import SHARING_PLAN_FILE, SharingSettings
from app.model.checkpoint import random_pipeline
from app.model.config import DEMO, VARConfig, VQVAEConfig
from app.quality.classifier import FashionClassifier, save_classifier
from app.quality.evaluation import Uncertainty, image_metrics, load_reference, open_feature_network
from app.quality.mixer import MixerClassifier
from app.tools import evaluate
from app.train.export import export_folder

ROOT = Path(__file__).parents[2]


# the demo model's classes, scales and image size, at the smallest width and depth: generation is the test's cost
TINY_DEMO = dataclasses.replace(
    DEMO,
    name="tiny-demo",
    var=VARConfig(depth=1, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, z_channels=8,
                  patch_nums=DEMO.var.patch_nums),
    vqvae=VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, in_channels=1,
                      patch_nums=DEMO.var.patch_nums),
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-weight model of the demo's shape but smaller, a small CNN and a small mixer judge (random weights:
    the test is about what the tool writes, not about the figures) and 60 reference images in a safetensors file."""
    root = tmp_path_factory.mktemp("tiny_eval")
    pipe = random_pipeline(TINY_DEMO)
    export_folder(TINY_DEMO, pipe.var, pipe.vqvae, root / "model")
    # cfg-share reads the sharing plan saved beside the checkpoint; random weights come without one
    calibrate_sharing(pipe, SharingSettings(batches=1, batch_size=2)).save(root / "model" / SHARING_PLAN_FILE)
    torch.manual_seed(0)
    save_classifier(FashionClassifier(feature_dim=16), root / "cnn", {})
    save_classifier(MixerClassifier(feature_dim=8, depth=1), root / "mixer", {})
    images = torch.randint(0, 256, (60, 1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    save_file({"images": images}, str(root / "ref.safetensors"))
    return {"root": root, "model": root / "model", "cnn": root / "cnn", "mixer": root / "mixer"}


def test_every_variant_is_judged_in_both_spaces_with_a_verdict_per_space(
    tiny_setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tiny_setup["root"], tiny_setup["root"] / "eval.json"
    argv = ["--model", str(tiny_setup["model"]), "--features", f"{tiny_setup['cnn']},{tiny_setup['mixer']}"]
    argv += ["--reference", str(root / "ref.safetensors"), "--variants", "baseline,cfg-share"]
    argv += ["--images-per-class", "1", "--greedy-per-class", "0", "--bootstrap", "20", "--kid-subsets", "4"]
    argv += ["--json", str(out), "--out-dir", str(root)]
    assert evaluate.main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["variant"], r["seed_set"]) for r in records] == [
        ("baseline", "main"), ("cfg-share", "main"), ("baseline", "noise-floor")
    ]  # fmt: skip
    for r in records:
        assert list(r["spaces"]) == ["cnn", "mixer"]
        for s in r["spaces"].values():
            assert 0 <= s["class_accuracy"] <= 1 and s["fid"] > 0 and s["kid_se"] > 0
            assert s["class_accuracy_ci"][0] <= s["class_accuracy"] <= s["class_accuracy_ci"][1]
            assert s["fid_ci"][0] < s["fid"] < s["fid_ci"][1]
        assert r["fid"] == r["spaces"]["cnn"]["fid"]  # the first space's figures stay top-level fields
        assert "greedy_agreement" not in r  # --greedy-per-class 0
    baseline, cfg_share, floor = records
    assert baseline["verdict"] == "ok" and all(s["worse_in"] == {} for s in baseline["spaces"].values())
    assert cfg_share["verdict"] == (
        "worse" if any(s["verdict"] == "worse" for s in cfg_share["spaces"].values()) else "ok"
    )
    assert "verdict" not in floor
    table = capsys.readouterr().out.split("verdict per feature space")[1].splitlines()
    assert table[1].split() == ["variant", "cnn", "mixer"] and table[3].startswith("cfg-share")


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


def test_a_single_kid_subset_is_refused_before_generating(capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--model", "/nonexistent", "--kid-subsets", "1"]) == 2
    assert "--kid-subsets must be at least 2" in capsys.readouterr().err


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
    metrics = image_metrics(reference[:10].add(1).div(2), [0] * 10, features, ref_feats, Uncertainty(10, kid_subsets=2))
    assert metrics["class_accuracy"] is None and metrics["class_accuracy_ci"] is None
    assert metrics["fid"] > 0 and metrics["fid_ci"] is not None and metrics["kid_se"] > 0


@pytest.mark.slow
@pytest.mark.data
def test_compressed_variants_are_judged_on_the_same_prompts_and_plotted(tmp_path: Path) -> None:
    out, png = tmp_path / "eval.json", tmp_path / "quality.png"
    argv = [
        "--model",
        str(ROOT / "model_store" / "demo"),
        "--variants",
        "baseline,litevar-eager",
        "--images-per-class",
        "2",
    ]
    argv += ["--features", str(ROOT / "model_store" / "demo_classifier")]
    argv += ["--greedy-per-class", "1", "--json", str(out), "--out-dir", str(tmp_path), "--plot", str(png)]
    assert evaluate.main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["variant"], r["images"]) for r in records] == [("baseline", 20), ("litevar-eager", 20), ("baseline", 20)]
    agreement = records[1]["greedy_agreement"]
    assert agreement[0] == 1.0  # the first scale's token is the class's, even in int8
    assert min(agreement) < 1.0  # and litevar is not the baseline: some greedy token changes
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"variant": v, "batch_size": 8, "images_per_second": s} for v, s in
                                 (("baseline", 30.0), ("litevar", 45.0))]))  # fmt: skip
    assert plots.main([str(out), str(bench), str(tmp_path / "vs_bench.png")]) == 0
    for p in (png, tmp_path / "vs_bench.png"):
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_a_worse_verdict_names_each_metric_in_the_units_of_the_table() -> None:
    space = {"verdict": "worse", "worse_in": {"class_accuracy": {"change": -0.015, "spread": 0.002},
                                              "fid": {"change": 16.1, "spread": 0.4}}}  # fmt: skip
    assert evaluate.verdict_text(space) == "worse: accuracy -1.50 pts (spread 0.20), FID +16.100 (spread 0.400)"
    assert evaluate.verdict_text({"verdict": "ok", "worse_in": {}}) == "ok"
