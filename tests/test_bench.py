"""The benchmark tool: records for every (variant, batch size), JSON fields later issues rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench import main

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
                "baseline,bf16",
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
        ("baseline", 1),
        ("baseline", 2),
        ("bf16", 1),
        ("bf16", 2),
    ]
    for r in records:
        assert r.keys() >= REQUIRED
        assert r["preset"] == "tiny" and r["device"] == "cpu"
        assert r["seconds_per_batch"] > 0 and r["peak_rss_bytes"] > 0
        assert r["images_per_second"] == pytest.approx(r["batch_size"] / r["seconds_per_batch"])
        assert {"transformer.scale0", "transformer.scale9", "transformer", "sampling", "decode"} <= r["stages"].keys()
    assert records[0]["speedup_vs_baseline"] == 1.0
    table = capsys.readouterr().out
    assert "baseline" in table and "bf16" in table


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--variants", "baseline,turbo"])
