"""Reading the Grafana dashboard docker/grafana/dashboards/variants.json: its panels, its PromQL queries with
the dashboard variables substituted, and the metric names the queries read."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.serve.metrics import ServeMetrics
from app.serve.quality_metrics import QualityMetrics

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "variants.json"
DATASOURCE_UID = "prometheus"  # docker/grafana/provisioning/datasources
VARIANT_VALUES = "label_values(var_variant_info, variant)"
RATE_INTERVAL = "$__rate_interval"
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left"}
PROMQL_WORDS |= {"group_right", "inf", "nan"}


@dataclass(frozen=True)
class Query:
    panel: str  # the panel's title
    panel_type: str
    ref: str
    expr: str
    legend: str

    @property
    def name(self) -> str:
        return f"{self.panel!r} {self.ref}"


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside a collapsed row included; rows themselves too."""
    found: list[dict[str, Any]] = []
    for p in dashboard.get("panels", []):
        found.append(p)
        found.extend(p.get("panels", []) if p.get("type") == "row" else [])
    return found


def queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(p.get("title", ""), p["type"], t.get("refId", ""), t.get("expr", ""), t.get("legendFormat", ""))
        for p in panels(dashboard)
        if p.get("type") != "row"
        for t in p.get("targets", [])
    ]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def variable_query(variable: dict[str, Any]) -> str:
    q = variable.get("query")
    return str(q.get("query", "")) if isinstance(q, dict) else str(q or "")


def referenced_variables(expr: str) -> set[str]:
    """Dashboard variables an expression uses: `$name`, `${name}` or `${name:format}`."""
    return {a or b for a, b in re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", expr)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """The expression as Grafana sends it, with each `$name` / `${name}` replaced by values[name]."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for the dashboard variable ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers, ranges,
    grouping clauses, functions, aggregations, keywords and numbers are taken out."""
    label_values = r"label_values\(\s*([\w:]+)\s*,\s*\w+\s*\)"  # a variable's query (Grafana's, not PromQL)
    names = set(re.findall(label_values, expr))
    e = re.sub(label_values, " ", expr)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in PROMQL_WORDS:
            continue  # a function or an aggregation; a keyword
        names.add(m.group())
    return names


def declared_series_names() -> set[str]:
    """Every series name a service's registry exposes (`ServeMetrics`, its collectors, and the offline quality
    a checkpoint's evaluation.json adds): counters with `_total`, histograms as `_bucket`, `_sum` and
    `_count`, summaries as `_sum` and `_count`, info metrics with `_info`."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
        "info": ("_info",),
    }
    registry = ServeMetrics(["baseline"], 8, 16).registry
    QualityMetrics(registry)
    return {f.name + s for f in registry.collect() for s in suffixes.get(f.type, ("",))}
