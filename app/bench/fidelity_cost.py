"""`python -m app.bench fidelity`: what shadow fidelity costs the clients, fidelity off against on, same run.

For each rate (`--rates`, default 0, the service's default and 1), a server of the demo model (baseline and
`--variant`, default litevar) is started with `VAR_FIDELITY_RATE` at that rate, and that variant is measured
in three phases:
- back to back: the median and p90 latency of one client's one-image requests, each sent as soon as the last
  was answered (the gaps are too short for the scorer, which waits for 20 ms without a request);
- paced: the same with `--pause-ms` between an answer and the next request, idle time the scorer takes, so
  that a request may arrive while it computes (the case where scoring can delay a client);
- saturated: the images per second of `--concurrency` clients.
Rates are measured in turns, `--rounds` times, one server at a time (an idle server's scorer would take
cores from the other); each figure is the median over rounds. Beside each phase: the samples scored (and,
saturated, dropped) in it, read from /metrics, which show whether scoring ran or was shed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.bench import prometheus_text
from app.bench.launcher import launched
from app.bench.served import closed_loop_rate, one_client_seconds
from app.bench.stats import median, percentile
from app.model.sampling import SamplingParams
from app.serve.settings import ServeSettings

PHASES = ("back_to_back", "paced")  # one client each; then the saturated phase


@dataclass
class RateFigures:
    rate: float
    rounds: list[dict[str, float]] = field(default_factory=list)  # one per round: figure -> value

    def median(self, figure: str) -> float:
        return median(r[figure] for r in self.rounds)


def fidelity_counts(url: str, variant: str) -> tuple[float, float]:
    """(scored, dropped) samples of `variant` so far."""
    samples = prometheus_text.scrape(f"{url}/metrics")
    scored = prometheus_text.total(samples, "var_fidelity_samples_total", variant=variant)
    return scored, prometheus_text.total(samples, "var_fidelity_dropped_total", variant=variant)


def measure_rate(a: argparse.Namespace, rate: float, round_: int) -> dict[str, float]:
    env = {
        "VAR_MODEL_DIR": str(a.model_dir),
        "VAR_VARIANTS": f"baseline,{a.variant}",
        "VAR_QUEUE_CAPACITY": str(max(64, 2 * a.concurrency)),
        "VAR_FIDELITY_RATE": str(rate),
    }
    figures: dict[str, float] = {}
    with launched(env, a.server_log) as server:
        info = httpx.get(f"{server.url}/models", timeout=10).json()
        params = SamplingParams(**info["defaults"])
        for i, (phase, pause_s) in enumerate(zip(PHASES, (0.0, a.pause_ms / 1000), strict=True)):
            scored0, _ = fidelity_counts(server.url, a.variant)
            first_seed = 10_000 * (round_ + 1) + 1000 * i
            seconds = one_client_seconds(server.url, a.variant, params, a.requests, first_seed, pause_s)
            figures[f"{phase}_p50_s"] = median(seconds)
            figures[f"{phase}_p90_s"] = percentile(seconds, 90)
            figures[f"{phase}_scored"] = fidelity_counts(server.url, a.variant)[0] - scored0
        scored0, dropped0 = fidelity_counts(server.url, a.variant)
        figures["images_per_s"] = asyncio.run(
            closed_loop_rate(server.url, a.variant, params, a.concurrency, a.load_requests)
        )
        scored1, dropped1 = fidelity_counts(server.url, a.variant)
        figures["saturated_scored"], figures["saturated_dropped"] = scored1 - scored0, dropped1 - dropped0
    return figures


def _ms(r: RateFigures, figure: str) -> str:
    return f"{1000 * r.median(figure):>8.1f}"


def print_table(variant: str, rows: list[RateFigures]) -> None:
    print(f"{variant} served, by fidelity rate; medians of {len(rows[0].rounds)} rounds (scored: samples scored)")
    print(f"{'':>6} {'back to back':^26} {'paced':^26} {'saturated':^24}")
    cols = f"{'p50 ms':>8} {'p90 ms':>8} {'scored':>8}"
    print(f"{'rate':>6} {cols} {cols} {'images/s':>9} {'scored':>6} {'dropped':>7}")
    for r in rows:
        one = [f"{_ms(r, f'{p}_p50_s')} {_ms(r, f'{p}_p90_s')} {r.median(f'{p}_scored'):>8.0f}" for p in PHASES]
        saturated = f"{r.median('images_per_s'):>9.1f} {r.median('saturated_scored'):>6.0f}"
        print(f"{r.rate:>6g} {' '.join(one)} {saturated} {r.median('saturated_dropped'):>7.0f}")


def main(argv: list[str] | None = None) -> int:
    default_rate = ServeSettings.model_fields["fidelity_rate"].default
    ap = argparse.ArgumentParser(prog="python -m app.bench fidelity", description=__doc__)
    ap.add_argument("--model-dir", type=Path, default=Path("model_store/demo"))
    ap.add_argument("--variant", default="litevar", help="the variant measured, served beside the reference (baseline)")
    ap.add_argument("--rates", default=f"0,{default_rate},1", help="comma-separated VAR_FIDELITY_RATE values")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100, help="one client's requests per phase and round")
    ap.add_argument("--pause-ms", type=float, default=50.0, help="paced phase: from an answer to the next request")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--load-requests", type=int, default=400, help="requests at --concurrency per round")
    ap.add_argument("--server-log", type=Path, help="where the started servers' output goes")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    a = ap.parse_args(argv)
    rows = [RateFigures(float(r)) for r in a.rates.split(",") if r.strip()]
    for round_ in range(a.rounds):
        for row in rows:
            row.rounds.append(measure_rate(a, row.rate, round_))
            print(f"round {round_ + 1}, rate {row.rate:g}: {row.rounds[-1]}", file=sys.stderr, flush=True)
    print_table(a.variant, rows)
    if a.json:
        records: list[dict[str, Any]] = [{"rate": r.rate, "rounds": r.rounds} for r in rows]
        a.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
