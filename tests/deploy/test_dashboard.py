"""The Grafana dashboard's JSON, read without Grafana: its shape, its data source, its variables, and that every
metric it queries is one `ServeMetrics` declares. tests/deploy/test_dashboard_live.py runs the queries."""

from __future__ import annotations

import re

import pytest

from tests.deploy.dashboard import (
    DATASOURCE_UID,
    RATE_INTERVAL,
    ROOT,
    VARIANT_VALUES,
    declared_series_names,
    load,
    metric_names,
    panels,
    queries,
    referenced_variables,
    variable_query,
    variables,
)

GRAFANA_GLOBALS = {"__rate_interval"}  # the only Grafana variable the queries use
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"


def test_dashboard_identity() -> None:
    dashboard = load()
    assert re.fullmatch(r"[\w-]{1,40}", dashboard.get("uid", "")), "a fixed uid of at most 40 characters"
    assert dashboard.get("title")
    assert "id" not in dashboard or dashboard["id"] is None, "a provisioned dashboard carries no database id"


def test_every_panel_queries_the_prometheus_data_source() -> None:
    shown = [p for p in panels(load()) if p.get("type") != "row"]
    assert shown
    for p in shown:
        title = p.get("title")
        assert title, f"panel {p.get('id')} has no title"
        assert p.get("datasource", {}).get("uid") == DATASOURCE_UID, f"{title!r}: data source uid {DATASOURCE_UID}"
        targets = p.get("targets") or []
        assert targets, f"{title!r} has no query"
        for t in targets:
            assert t.get("expr", "").strip(), f"{title!r} {t.get('refId')}: empty query"
            assert t.get("datasource", p["datasource"]).get("uid") == DATASOURCE_UID, f"{title!r} {t.get('refId')}"
        refs = [t.get("refId") for t in targets]
        assert len(set(refs)) == len(refs), f"{title!r}: refIds repeat: {refs}"


def test_panel_ids_and_positions() -> None:
    found = panels(load())
    ids = [p.get("id") for p in found]
    assert len(set(ids)) == len(ids), f"panel ids repeat: {ids}"
    for p in found:
        g = p.get("gridPos", {})
        assert {"x", "y", "w", "h"} <= set(g), f"{p.get('title')!r}: gridPos"
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{p.get('title')!r} is wider than the 24 grid columns"


def test_the_compared_pair_is_chosen_by_variables() -> None:
    found = variables(load())
    for name in ("baseline", "compressed"):
        assert name in found, f"no ${name} variable"
        v = found[name]
        assert v.get("type") == "query" and v.get("datasource", {}).get("uid") == DATASOURCE_UID
        assert variable_query(v) == VARIANT_VALUES, f"${name} lists the loaded variants ({VARIANT_VALUES})"
        assert not v.get("multi") and not v.get("includeAll"), f"${name} is one variant"
    assert found["baseline"]["current"]["value"] == "baseline"
    ratio_panels = [q for q in queries(load()) if {"baseline", "compressed"} <= referenced_variables(q.expr)]
    assert len({q.panel for q in ratio_panels}) >= 4, "ratio panels: p50 and p95 latency, throughput, memory"


def test_queries_use_only_known_variables_and_one_rate_window() -> None:
    known = set(variables(load())) | GRAFANA_GLOBALS
    for q in queries(load()):
        unknown = referenced_variables(q.expr) - known
        assert not unknown, f"{q.name} uses undefined variables {unknown}"
        windows = set(re.findall(r"\[([^\]]*)\]", q.expr))
        assert windows <= {RATE_INTERVAL}, f"{q.name}: every range is [{RATE_INTERVAL}], not {windows}"


def test_every_queried_metric_is_declared_by_serve_metrics() -> None:
    declared = declared_series_names()
    dashboard = load()
    expressions = [q.expr for q in queries(dashboard)]
    expressions += [variable_query(v) for v in variables(dashboard).values()]
    for expr in expressions:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r} (the parser may be broken)"
        undeclared = names - declared
        assert not undeclared, f"{expr!r} reads {sorted(undeclared)}, which ServeMetrics does not declare"


@pytest.mark.parametrize(
    "expr, names",
    [
        ('sum by (variant, le) (rate(var_x_bucket{variant="$baseline"}[$__rate_interval]))', {"var_x_bucket"}),
        ("a / on (variant) group_left () sum(b) or on () vector(0)", {"a", "b"}),
        ("histogram_quantile(0.5, x) + 1e3 > bool 2", {"x"}),
        ("label_values(var_variant_info, variant)", {"var_variant_info"}),
    ],
)
def test_metric_name_parser(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_panel_is_described_in_the_deployment_doc() -> None:
    doc = DEPLOYMENT_DOC.read_text()
    missing = [p["title"] for p in panels(load()) if p.get("type") != "row" and p["title"] not in doc]
    assert not missing, f"docs/deployment.md does not describe the panels {missing}"
