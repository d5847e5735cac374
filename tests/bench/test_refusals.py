"""`python -m app.bench refusals`: every request of its rounds is refused (hey.run raises on any other
answer), and the CPU per refusal it reports is that of this process over the requests answered."""

from __future__ import annotations

import json

import pytest

from app.bench.__main__ import main as bench_main
from tests.conftest import DEMO


@pytest.mark.slow
def test_every_request_is_refused_and_its_cost_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["refusals", "--model-dir", str(DEMO), "--requests", "300", "--rounds", "2"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["rounds_us"]) == 2
    # a refusal is tens to hundreds of microseconds of CPU; a cost of 0 or of a generation would be wrong
    assert 5 < record["cpu_per_refusal_us"] < 5_000
