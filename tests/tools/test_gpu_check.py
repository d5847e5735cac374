"""`python -m app gpu-check`, run on the CPU at the tiny shape (its twin of a GPU run): the report, and
exit status 1 when the device does not reproduce the official code's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from app.__main__ import main
from tests.conftest import SHARED_ALN, TINY

CPU_TWIN = ["gpu-check", "--device", "cpu", "--preset", "tiny", "--variants", "baseline", "--batch-size", "2"]
CPU_TWIN += ["--policy-requests", "6"]  # the batching policies' loads: a few requests suffice on the CPU
# litevar compiles where int8 runs on torch._int_mm: minutes of compiling in a test; its eager twin serves alike
CPU_TWIN += ["--policy-variants", "baseline,litevar-eager"]


@pytest.mark.slow
def test_the_cpu_twin_reports_conformance_memory_and_the_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert main([*CPU_TWIN, "--runs", "1", "--fixtures", f"{TINY},{SHARED_ALN}", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"]["device"] == "cpu" and report["failed"] == []
    assert {name: c["passed"] for name, c in report["conformance"].items()} == {TINY.name: True, SHARED_ALN.name: True}
    assert all(c["checks"] > 10 for c in report["conformance"].values())
    assert report["memory"]["kv_cache_bytes"] > 0 and report["memory"]["batch_size"] == 2
    [record] = report["benchmark"]
    assert record["variant"] == "baseline" and record["batch_size"] == 2 and record["seconds_per_batch"] > 0
    runs = report["batching_policies"]["runs"]
    assert {(r["policy"], r["level"]) for r in runs} == {(p, x) for p in ("whole", "scale") for x in (0.0, 0.5, 0.9)}


@pytest.mark.slow
def test_a_device_that_does_not_reproduce_the_official_outputs_fails(tmp_path: Path) -> None:
    folder = tmp_path / "fixture"
    shutil.copytree(TINY, folder)
    sd = torch.load(folder / "var.pth", weights_only=True)
    sd["blocks.1.ffn.fc2.bias"] = sd["blocks.1.ffn.fc2.bias"] + 0.01  # as if the device computed otherwise
    torch.save(sd, folder / "var.pth")
    out = tmp_path / "gpu.json"
    assert main([*CPU_TWIN, "--runs", "1", "--fixtures", str(folder), "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == ["fixture"] and "greedy tokens" in report["conformance"]["fixture"]["failed"]


def test_a_cuda_run_without_a_cuda_device_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gpu-check", "--json", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
