"""Verdicts: is a variant worse than the baseline, in each feature space, by more than sampling alone moves it?

Sampling alone is the baseline's seed-to-seed spread: how far each metric moves between the baseline's main
seed list and its second one (the noise floor). A variant is worse in a space when one of that space's
judged metrics is worse than the baseline's by more than that spread. One space saying "ok" does not
outvote another saying "worse": the record's own verdict is "worse" when any space's is.
"""

from __future__ import annotations

from typing import Any

JUDGED = {"class_accuracy": 1, "fid": -1, "kid": -1}  # +1: higher is better; -1: lower is better


def seed_spread(main: dict[str, Any], floor: dict[str, Any]) -> dict[str, float]:
    """|main - noise floor| of each judged metric of one space (metrics without a value are left out)."""
    return {
        metric: abs(main[metric] - floor[metric])
        for metric in JUDGED
        if main.get(metric) is not None and floor.get(metric) is not None
    }


def worse_metrics(variant: dict[str, Any], baseline: dict[str, Any], spread: dict[str, float]) -> dict[str, Any]:
    """The judged metrics of one space on which `variant` is worse than `baseline` by more than `spread`,
    with the change (variant - baseline) and the spread."""
    worse = {}
    for metric, better in JUDGED.items():
        if metric not in spread or variant.get(metric) is None:
            continue
        change = variant[metric] - baseline[metric]
        if -better * change > spread[metric]:
            worse[metric] = {"change": round(change, 6), "spread": round(spread[metric], 6)}
    return worse


def _find(records: list[dict[str, Any]], seed_set: str, variant: str | None = None) -> dict[str, Any] | None:
    return next(
        (r for r in records if r["seed_set"] == seed_set and (variant is None or r["variant"] == variant)), None
    )


def add_verdicts(records: list[dict[str, Any]], baseline: str = "baseline") -> bool:
    """Give every main-seed record a verdict per space (`spaces[name]["verdict"]`, `["worse_in"]`) and its own
    `verdict`. False, and nothing added, without the baseline's main record and the noise-floor record."""
    base, floor = _find(records, "main", baseline), _find(records, "noise-floor")
    if base is None or floor is None:
        return False
    spreads = {name: seed_spread(space, floor["spaces"][name]) for name, space in base["spaces"].items()}
    for r in records:
        if r["seed_set"] != "main":
            continue
        for name, space in r["spaces"].items():
            space["worse_in"] = worse_metrics(space, base["spaces"][name], spreads[name])
            space["verdict"] = "worse" if space["worse_in"] else "ok"
        r["verdict"] = "worse" if any(s["verdict"] == "worse" for s in r["spaces"].values()) else "ok"
    return True
