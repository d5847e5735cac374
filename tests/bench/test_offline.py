"""The benchmark tool: records for every (variant, batch size), JSON fields later issues rely on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from app.bench.offline import main
from app.bench.runner import PROBE_SIZE, Contender, machine_gflops, measure
from app.compress.hardware import detected
from tests.conftest import DEMO

REQUIRED = {
    "variant",
    "preset",
    "device",
    "batch_size",
    "seconds_per_batch",
    "images_per_second",
    "peak_rss_bytes",
    "stages",
    "speedup_vs_baseline",
}


def test_bench_writes_one_record_per_variant_and_batch_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--variants",
                "bf16,baseline",  # the first variant is the reference, whatever its name
                "--batch-sizes",
                "1,2",
                "--runs",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    records = json.loads(out.read_text())
    assert [(r["variant"], r["batch_size"]) for r in records] == [
        ("bf16", 1),
        ("bf16", 2),
        ("baseline", 1),
        ("baseline", 2),
    ]
    for r in records:
        assert r.keys() >= REQUIRED
        assert r["preset"] == "tiny" and r["device"] == "cpu"
        assert r["seconds_per_batch"] > 0 and r["peak_rss_bytes"] > 0
        assert r["images_per_second"] == pytest.approx(r["batch_size"] / r["seconds_per_batch"])
        assert {"transformer.scale0", "transformer.scale9", "transformer", "sampling", "decode"} <= r["stages"].keys()
        assert len(r["machine_gflops_all"]) == r["runs"] == 1 and r["machine_gflops"] > 0
    # speed-ups and attention shares against the first variant at the same batch size
    reference = {r["batch_size"]: r for r in records if r["variant"] == "bf16"}
    for r in records:
        ref = reference[r["batch_size"]]
        assert r["speedup_vs_baseline"] == pytest.approx(ref["seconds_per_batch"] / r["seconds_per_batch"])
        assert r["attention_share"] == pytest.approx(r["attention_flops"] / ref["attention_flops"])
        assert r["build_seconds"] >= 0 and r["first_call_seconds"] > 0
    table = capsys.readouterr().out
    assert "baseline" in table and "bf16" in table and "GFLOP/s" in table
    assert "relative to 'bf16'" in table
    assert "start bf16: passes" in table and "first call batch 1" in table


def test_the_first_call_is_recorded_apart_from_the_timed_ones() -> None:
    """A contender whose first call compiles (here: sleeps) reports that call as its start, not in its times."""
    calls = []

    def compiling(labels: list[int], seed: int) -> dict[str, float]:
        calls.append(seed)
        if len(calls) == 1:
            time.sleep(0.2)
        return {}

    (record,) = measure(
        [Contender("compiled", compiling, None, build_seconds=1.5)],
        preset="tiny", device="cpu", batch_size=2, runs=2, num_classes=10,
    )  # fmt: skip
    assert len(calls) == 3 and calls[0] == 0  # one warm-up (seed 0), then the timed runs
    assert record.first_call_seconds is not None and record.first_call_seconds >= 0.2
    assert max(record.seconds_per_batch_all) < 0.2 and record.build_seconds == 1.5


def test_machine_probe_measures_gemm_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = machine_gflops("cpu")
    assert fast is not None and 0.1 < fast < 1e5  # anything from a tiny VM to a large server
    assert machine_gflops("cuda") is None
    real_mm = torch.mm

    def slow_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a machine 50 ms slower per probe GEMM
        time.sleep(0.05)
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", slow_mm)
    slow = machine_gflops("cpu")
    assert slow is not None and slow < 2 * PROBE_SIZE**3 / 0.05 / 1e9 < fast


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--variants", "baseline,turbo"])


def test_compressed_variants_report_stored_bytes_and_attention_flops(tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--checkpoint", str(DEMO), "--variants", "baseline,litevar-eager,guidance-off", "--batch-sizes", "2"]
    assert main([*args, "--runs", "1", "--json", str(out), "--plot", str(plot)]) == 0
    base, lite, late = json.loads(out.read_text())
    assert base["weight_bytes"] > 0 and base["attention_flops"] > lite["attention_flops"] > 0
    assert lite["weight_bytes"] < 0.45 * base["weight_bytes"]  # int8 linears, bf16 fc2 and decoder
    for r in (lite, late):  # each variant's attention FLOPs over the reference's, as both were measured
        assert r["attention_share"] == pytest.approx(r["attention_flops"] / base["attention_flops"])
        assert 0 < r["attention_share"] < 1
    assert late["weight_bytes"] == base["weight_bytes"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_records_name_the_machine_and_the_kernels_each_variant_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forced to AVX2's table: int8 on fbgemm, fc2 upcast to float32; the record says so, read from the modules,
    beside the real CPU's flags."""
    monkeypatch.setenv("VAR_CPU_ISA", "avx2")
    out = tmp_path / "bench.json"
    args = ["--preset", "tiny", "--variants", "baseline,w8a8", "--batch-sizes", "1", "--runs", "1"]
    assert main([*args, "--json", str(out)]) == 0
    base, w8a8 = json.loads(out.read_text())
    for r in (base, w8a8):
        assert r["cpu_model"] and r["cpu_isa"] == "avx2" and r["cpu_isa_forced"]
        assert r["cpu_flags"] == detected().recorded_flags()  # the machine as it is, forced or not
        assert not r["step_compiled"]
    assert set(base["layer_kernels"].values()) == {"float32"}
    assert w8a8["layer_kernels"]["attn.mat_qkv"] == "int8/fbgemm" and w8a8["layer_kernels"]["ffn.fc2"] == "bf16/float32"
    table = capsys.readouterr().out
    flags = ", ".join(f for f, present in base["cpu_flags"].items() if present)
    assert f"cpu: {base['cpu_model']} ({flags}), kernels chosen for avx2 (forced)" in table
    assert "kernels w8a8: " in table and "attn.mat_qkv int8/fbgemm" in table
