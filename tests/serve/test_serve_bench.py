"""`python -m app.bench serve` against the live server, with tiny counts: the records and the table it writes.
(Performance itself is measured by running the benchmark, not here.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench.__main__ import main as bench_main
from tests.serve.conftest import LiveServer


def test_serve_benchmark_writes_records_and_a_table(
    live_server: LiveServer, demo_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "serve.json"
    args = ["--url", live_server.url, "--model-dir", str(demo_folder), "--variants", "baseline"]
    args += ["--requests", "3", "--load-requests", "8", "--concurrency", "4", "--offline-runs", "2", "--threads", "1,2"]
    assert bench_main(["serve", *args, "--json", str(out)]) == 0
    [record] = json.loads(out.read_text())
    assert record["variant"] == "baseline" and record["max_batch_size"] == 4 and record["concurrency"] == 4
    offline = {o["threads"]: o for o in record["offline"]}
    assert set(offline) == {1, 2} and all(o["latency_s"] > 0 and o["images_per_s"] > 0 for o in offline.values())
    # the best of the thread counts is what the served figures are held to
    assert record["offline_latency_s"] == min(o["latency_s"] for o in offline.values())
    assert offline[record["best_latency_threads"]]["latency_s"] == record["offline_latency_s"]
    assert record["offline_images_per_s"] == max(o["images_per_s"] for o in offline.values())
    assert record["latency_target_s"] == pytest.approx(1.05 * record["offline_latency_s"] + 0.015)
    for figure in (record["latency"], record["throughput"]):
        assert len(figure["ours"]) == 2 and figure["median"] > 0
        assert len(figure["hey"]) == 2 and isinstance(figure["hey_agrees"], bool)  # hey: a Debian package of make
    assert 1 <= record["mean_batch_size"] <= 4
    assert "mean batch" in capsys.readouterr().out
