"""`python -m app.bench fidelity`: servers with shadow fidelity off and on, measured in turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench.fidelity_cost import main

pytestmark = pytest.mark.slow


def test_rates_are_measured_in_turns_and_scoring_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fidelity.json"
    argv = ["--variant", "litevar-eager", "--rates", "0,1", "--rounds", "1", "--requests", "6", "--concurrency", "2"]
    argv += ["--load-requests", "4"]
    assert main([*argv, "--pause-ms", "100", "--json", str(out)]) == 0
    off, on = json.loads(out.read_text())
    assert (off["rate"], on["rate"]) == (0.0, 1.0)
    for r in (off, on):
        (figures,) = r["rounds"]
        assert figures["images_per_s"] > 0
        for phase in ("back_to_back", "paced"):
            assert 0 < figures[f"{phase}_p50_s"] <= figures[f"{phase}_p90_s"]
    assert all(v == 0 for k, v in off["rounds"][0].items() if k.endswith(("_scored", "_dropped")))
    assert on["rounds"][0]["paced_scored"] > 0  # 100 ms between requests: idle time the scorer takes
    table = capsys.readouterr().out
    assert "back to back" in table and len(table.strip().splitlines()) == 5
