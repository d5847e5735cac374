"""The load test's report: percentiles and counts per variant and status, the failures, the table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from app.bench.load.client import Outcome, RunResult, problems
from app.bench.load.plan import KINDS, Segment
from app.bench.stats import percentile


# ---- the report ----------------------------------------------------------------------------------
def percentile_ms(values: Sequence[float], q: int) -> float | None:
    """The q-th percentile of `values` (seconds) in milliseconds (app.bench.stats); None for no values, which
    the JSON keeps as null and the table prints as "-"."""
    return 1000 * percentile(values, q) if values else None


def status_key(o: Outcome) -> str:
    if o.status is not None:
        return str(o.status)
    return "cancelled" if o.cancelled else "unanswered"


def summarize(
    res: RunResult, profile: Sequence[Segment], variants: Sequence[str], allowance_s: float
) -> dict[str, Any]:
    outs = res.outcomes
    flagged = Counter(p for o in outs for p in problems(o, allowance_s))
    ok = [o for o in outs if o.status == 200]
    span = max(res.span_s, sum(s.seconds for s in profile))  # from the first arrival to the last answer
    totals = {
        "requests": len(outs),
        "answered": sum(o.status is not None for o in outs),
        "cancelled": sum(o.cancelled for o in outs),
        "unanswered": flagged["unanswered"],
        "late": flagged["late"],
        "unexpected_5xx": flagged["unexpected_5xx"],
        "wrong_answers": flagged["wrong_answer"],
        "by_status": dict(sorted(Counter(status_key(o) for o in outs).items())),
        "by_kind": {k: dict(sorted(Counter(status_key(o) for o in outs if o.kind == k).items())) for k in KINDS},
        "images": sum(o.images for o in ok),
        "images_per_second": sum(o.images for o in ok) / span,
        "answers_per_second": sum(o.status is not None for o in outs) / span,
        "duration_s": span,
        "schedule_lag_p99_ms": percentile_ms(res.lag_s, 99),
        "schedule_lag_max_ms": 1000 * max(res.lag_s, default=0.0),
        "max_inflight": res.max_inflight,
        "client_cpu_s": res.client_cpu_s,
        "server_cpu_s": res.server_cpu_s,
        "refusal_p99_ms": percentile_ms([o.latency_s for o in outs if o.status in (422, 429) and o.latency_s], 99),
    }
    per_variant = {}
    for v in variants:
        mine = [o for o in ok if o.variant == v]
        lat = [o.latency_s for o in mine if o.latency_s is not None]
        per_variant[v] = {
            "requests": sum(o.variant == v and o.kind != "invalid" for o in outs),
            "ok": len(mine),
            "images": sum(o.images for o in mine),
            "p50_ms": percentile_ms(lat, 50),
            "p95_ms": percentile_ms(lat, 95),
            "p99_ms": percentile_ms(lat, 99),
            "images_per_second": sum(o.images for o in mine) / span,
        }
    phases, start = [], 0.0
    for seg in profile:
        end = start + seg.seconds
        mine = [o for o in outs if o.phase == seg.name]
        done = [o for o in ok if o.done_s is not None and start <= o.done_s < end]
        lat = [o.latency_s for o in mine if o.status == 200 and o.latency_s is not None]
        phases.append(
            {
                "name": seg.name,
                "start_s": start,
                "end_s": end,
                "start_level": seg.start_level,
                "end_level": seg.end_level,
                "requests": len(mine),
                "offered_per_second": len(mine) / seg.seconds if seg.seconds else 0.0,
                "by_status": dict(sorted(Counter(status_key(o) for o in mine).items())),
                "images_per_second": sum(o.images for o in done) / seg.seconds if seg.seconds else 0.0,
                "p50_ms": percentile_ms(lat, 50),  # of the 200 answers to the requests sent in this phase
                "p99_ms": percentile_ms(lat, 99),
            }
        )
        start = end
    errors = Counter(o.error for o in outs if o.error)
    return {"totals": totals, "variants": per_variant, "phases": phases, "errors": dict(errors.most_common(10))}


def overload_goodput(phases: Sequence[dict[str, Any]], capacity: float) -> float | None:
    """Images per second answered 200 while offered more than the capacity throughout (the ramp's held peak, a
    steady level above 1), over the capacity; None when no phase is overloaded throughout."""
    over = [p for p in phases if min(p["start_level"], p["end_level"]) > 1 and p["end_s"] > p["start_s"]]
    if not over or capacity <= 0:
        return None
    seconds = sum(p["end_s"] - p["start_s"] for p in over)
    return sum(p["images_per_second"] * (p["end_s"] - p["start_s"]) for p in over) / seconds / capacity


def mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def print_report(report: dict[str, Any]) -> None:
    t = report["totals"]
    print(
        f"capacity {report['capacity_images_per_second']:.1f} images/s ({report['capacity_source']}); "
        f"profile {report['profile_name']}, {report['duration_s']:g} s; {report['date']}"
    )
    statuses = sorted({s for ph in report["phases"] for s in ph["by_status"]}, key=lambda s: (not s.isdigit(), s))
    head = f"{'phase':<10} {'level':>9} {'offered/s':>9} {'images/s':>8} {'p50':>8} {'p99':>8} "
    print(head + " ".join(f"{s:>10}" for s in statuses))
    for ph in report["phases"]:
        level = f"{ph['start_level']:g}-{ph['end_level']:g}x"
        counts = " ".join(f"{ph['by_status'].get(s, 0):>10}" for s in statuses)
        print(
            f"{ph['name']:<10} {level:>9} {ph['offered_per_second']:>9.1f} {ph['images_per_second']:>8.1f} "
            f"{ms(ph['p50_ms']):>8} {ms(ph['p99_ms']):>8} {counts}"
        )
    print(f"{'variant':<10} {'200s':>6} {'p50':>8} {'p95':>8} {'p99':>8} {'images/s':>9}")
    for name, v in report["variants"].items():
        print(
            f"{name:<10} {v['ok']:>6} {ms(v['p50_ms']):>8} {ms(v['p95_ms']):>8} {ms(v['p99_ms']):>8} "
            f"{v['images_per_second']:>9.1f}"
        )
    rej = ", ".join(f"{k} {v:g}" for k, v in sorted(report["rejections"].items()) if v)
    print(f"rejections (server /metrics, during the run): {rej or 'none'}")
    rss = report["rss"]
    line = f"server RSS ({rss['source']}): start {mib(rss['start_bytes'])}, peak {mib(rss['peak_bytes'])}, "
    line += f"end {mib(rss['end_bytes'])}"
    if (g := rss["growth"]["growth"]) is not None:
        line += f"; median of the last window {100 * g:+.1f}% over the first after warm-up"
    print(line)
    print(
        f"requests {t['requests']}: answered {t['answered']}, cancelled {t['cancelled']}, unanswered "
        f"{t['unanswered']}, late {t['late']}, unexpected 5xx {t['unexpected_5xx']}, wrong answers "
        f"{t['wrong_answers']}; {t['images_per_second']:.1f} images/s, schedule lag p99 "
        f"{ms(t['schedule_lag_p99_ms'])}, most in flight {t['max_inflight']}"
    )
    server_cpu = "-" if t["server_cpu_s"] is None else f"{t['server_cpu_s']:.0f} s"
    print(
        f"CPU during the run: this tool {t['client_cpu_s']:.0f} s, the server {server_cpu}, "
        f"over {t['duration_s']:.0f} s of wall time"
    )
    if (goodput := report["overload_goodput_ratio"]) is not None:
        print(f"overload goodput: {goodput:.2f}x the capacity (images answered 200 per second while overloaded)")
    for failure in report["failures"]:
        print(f"FAILED: {failure}")


def failures(
    report: dict[str, Any], max_rss_growth: float | None, server_alive: bool, min_goodput: float | None = None
) -> list[str]:
    t = report["totals"]
    found = [f"{k}: {t[k]}" for k in ("unanswered", "late", "unexpected_5xx", "wrong_answers") if t[k]]
    goodput = report["overload_goodput_ratio"]
    if min_goodput is not None and (goodput is None or goodput < min_goodput):
        found.append(f"overload goodput {goodput if goodput is None else f'{goodput:.2f}'}x (at least {min_goodput:g})")
    growth = report["rss"]["growth"]["growth"]
    if max_rss_growth is not None and (growth is None or growth > max_rss_growth):
        found.append(f"RSS growth {growth if growth is None else f'{100 * growth:+.1f}%'} (limit {max_rss_growth:.0%})")
    if not server_alive:
        found.append("the server exited during the run")
    return found
