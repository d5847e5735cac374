"""`python -m app.bench load`: the arrival schedule, the verdict on each outcome, the RSS check, loopback only;
and a short run against a started server (baseline and litevar-eager of the demo model), whose JSON must say that
every request was answered or cancelled on purpose, none late, no 5xx, with 429s under overload and 422s
for the invalid bodies."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from pathlib import Path

import httpx
import pytest

from app.bench.__main__ import main as bench_main
from app.bench.load.client import Outcome, problems
from app.bench.load.plan import Segment, arrival_times, phase_of, ramp_profile, steady_profile
from app.bench.load.report import failures, overload_goodput
from app.bench.load.server import metrics, rss_growth
from tests.conftest import DEMO


def expected_arrivals(profile: list[Segment], capacity: float) -> float:
    return sum(capacity * s.seconds * (s.start_level + s.end_level) / 2 for s in profile)


def test_even_arrivals_follow_the_ramp() -> None:
    profile = ramp_profile(100, peak=4)
    times = arrival_times(profile, capacity=10, rng=random.Random(0), poisson=False, limit=100_000)
    assert len(times) == pytest.approx(expected_arrivals(profile, 10), abs=1)  # 0.15x0.5 + 0.2x2.5 + ... = 2.35
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= 100
    overload = [t for t in times if phase_of(profile, t) == "overload"]
    assert len(overload) == pytest.approx(30 * 40, abs=1)  # 30 s at 4 x 10 requests per second
    gaps = [b - a for a, b in itertools.pairwise(overload)]
    assert max(gaps) == pytest.approx(min(gaps)) == pytest.approx(1 / 40)


def scrape(statuses: list[int]) -> object:
    """`metrics` against a stand-in that answers `statuses` in turn; what it returned or raised."""
    answers = iter(statuses)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), text="var_up 1\n")

    async def scraped() -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://t") as client:
            try:
                return await metrics(client)
            except httpx.HTTPStatusError as e:
                return e.response.status_code

    return asyncio.run(scraped())


def test_a_scrape_refused_by_the_connection_limit_is_retried_and_any_other_refusal_raises() -> None:
    assert scrape([503, 503, 200]) == {("var_up", frozenset()): 1.0}
    assert scrape([500]) == 500


def test_poisson_arrivals_are_seeded_and_bounded() -> None:
    profile = steady_profile(200, level=1)
    a = arrival_times(profile, 5, random.Random(7), poisson=True, limit=100_000)
    assert a == arrival_times(profile, 5, random.Random(7), poisson=True, limit=100_000)
    assert len(a) == pytest.approx(1000, rel=0.15) and a == sorted(a) and a[-1] <= 200
    assert len(arrival_times(profile, 5, random.Random(7), poisson=True, limit=10)) == 10


def outcome(kind: str = "good", status: int | None = 200, latency_s: float | None = 0.5, **kw: object) -> Outcome:
    o = Outcome(0, kind, "baseline", "warm", 0.0, timeout_s=2.0, status=status, latency_s=latency_s)
    o.images, o.answer_variant = (1, "baseline") if status == 200 else (0, None)
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def test_verdicts() -> None:
    allowance = 0.5
    assert problems(outcome(), allowance) == set()
    assert problems(outcome(status=None, latency_s=None), allowance) == {"unanswered"}
    assert problems(outcome("cancel", status=None, latency_s=None, cancelled=True), allowance) == set()
    assert problems(outcome(latency_s=2.6), allowance) == {"late"}
    assert problems(outcome(status=504, latency_s=2.01), allowance) == set()  # its deadline passed
    assert problems(outcome(status=504, latency_s=1.0), allowance) == {"unexpected_5xx"}  # before its deadline
    assert problems(outcome(status=500), allowance) == {"unexpected_5xx"}
    assert problems(outcome(status=503, retry_after="1"), allowance) == {"unexpected_5xx"}
    assert problems(outcome(status=429, retry_after="1"), allowance) == set()
    assert problems(outcome(status=429), allowance) == {"wrong_answer"}  # no Retry-After
    assert problems(outcome("invalid", status=422), allowance) == set()
    assert problems(outcome("invalid", status=429, retry_after="1"), allowance) == set()  # the queue was full
    assert problems(outcome("invalid", status=200), allowance) == {"wrong_answer"}
    assert problems(outcome(status=422), allowance) == {"wrong_answer"}
    assert problems(outcome(answer_variant="litevar"), allowance) == {"wrong_answer"}


def test_rss_growth_compares_the_medians_of_two_windows() -> None:
    samples = [(float(t), 100 + (5 if t >= 120 else 0) + (1000 if t < 10 else 0)) for t in range(181)]
    g = rss_growth(samples, warmup_s=60, window_s=60, end_s=180)
    assert g["first_median_bytes"] == 100 and g["last_median_bytes"] == 105
    assert g["growth"] == pytest.approx(0.05)
    assert rss_growth(samples[:50], 60, 60, 180)["growth"] is None


def phase(name: str, start_s: float, end_s: float, levels: tuple[float, float], images_per_s: float) -> dict:
    return {"name": name, "start_s": start_s, "end_s": end_s, "start_level": levels[0], "end_level": levels[1],
            "images_per_second": images_per_s}  # fmt: skip


def test_overload_goodput_counts_only_phases_overloaded_throughout() -> None:
    ramp = [phase("warm", 0, 15, (0, 1), 5.0), phase("ramp-up", 15, 35, (1, 4), 9.0)]
    ramp += [phase("overload", 35, 65, (4, 4), 9.5), phase("ramp-down", 65, 85, (4, 1), 8.0)]
    assert overload_goodput(ramp, capacity=10) == pytest.approx(0.95)
    held = [phase("a", 0, 10, (2, 2), 10.0), phase("b", 10, 40, (3, 3), 6.0)]
    assert overload_goodput(held, capacity=10) == pytest.approx((10 * 10 + 30 * 6) / 40 / 10)  # weighted by time
    assert overload_goodput([phase("steady", 0, 60, (1, 1), 10.0)], capacity=10) is None


def test_a_goodput_below_the_minimum_is_a_failure() -> None:
    counts = dict.fromkeys(("unanswered", "late", "unexpected_5xx", "wrong_answers"), 0)
    report = {"totals": counts, "rss": {"growth": {"growth": None}}, "overload_goodput_ratio": 0.9}
    assert failures(report, None, True) == [] and failures(report, None, True, min_goodput=0.9) == []
    assert failures(report, None, True, min_goodput=0.95) == ["overload goodput 0.90x (at least 0.95)"]
    assert failures(report | {"overload_goodput_ratio": None}, None, True, min_goodput=0.95)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://localhost:8000", "https://127.0.0.1:8000"])
def test_only_the_loopback_address_is_loaded(url: str) -> None:
    with pytest.raises(SystemExit, match="loopback"):
        bench_main(["load", "--url", url])


@pytest.mark.slow
def test_short_run_answers_every_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, log = tmp_path / "load.json", tmp_path / "server.log"
    args = ["load", "--model-dir", str(DEMO), "--variants", "baseline,litevar-eager", "--server-log", str(log)]
    args += ["--set", "VAR_MAX_BATCH_SIZE=4", "--set", "VAR_QUEUE_CAPACITY=8", "--set", "VAR_MAX_IMAGES_PER_REQUEST=4"]
    args += ["--capacity-requests", "16"]
    args += ["--duration", "10", "--timeout-s", "5", "--short-timeout-s", "1", "--grace-s", "5"]
    args += ["--invalid-share", "0.15", "--cancel-share", "0.15", "--rss-interval-s", "0.25", "--json", str(out)]
    t0 = time.monotonic()
    status = bench_main(args)
    elapsed = time.monotonic() - t0
    report = json.loads(out.read_text())
    t = report["totals"]
    assert (status, t["unanswered"], t["late"], t["unexpected_5xx"], t["wrong_answers"]) == (0, 0, 0, 0, 0), (
        report["failures"],
        report["errors"],
        log.read_text()[-3000:],
    )
    assert t["requests"] == t["answered"] + t["cancelled"] > 100
    # every invalid body, and nothing else, got 422, or 429 while the queue was full
    assert set(t["by_kind"]["invalid"]) <= {"422", "429"} and t["by_kind"]["invalid"]["422"] > 0
    assert t["cancelled"] > 0 and report["rejections"]["invalid"] == t["by_status"]["422"]
    overload = next(p for p in report["phases"] if p["name"] == "overload")
    refused = overload["by_status"].get("429", 0)
    assert refused > 0 and report["rejections"]["queue_full"] >= refused
    for variant in ("baseline", "litevar-eager"):
        v = report["variants"][variant]
        assert v["ok"] > 0 and 0 < v["p50_ms"] <= v["p95_ms"] <= v["p99_ms"] and v["images_per_second"] > 0
    rss = report["rss"]
    assert rss["source"].startswith("/proc/") and len(rss["samples"]) >= 20 and rss["peak_bytes"] > 100 * 2**20
    assert report["capacity_images_per_second"] > 0 and "python -m app.bench load" in report["command"]
    assert report["overload_goodput_ratio"] == pytest.approx(
        overload["images_per_second"] / report["capacity_images_per_second"]
    )
    assert "unexpected 5xx 0" in capsys.readouterr().out
    assert elapsed < 60, f"the short run took {elapsed:.0f} s"
