"""The documentation against the code: the tables of docs/serving.md, the relative links, the README's length.

Settings table (docs/serving.md, header `variable | default | description`): one row per field of
`ServeSettings`, in any order. `variable` is the environment variable (the settings' `env_prefix` plus the
field name in upper case), `description` is the field's description word for word, and `default` is the
default as it would be written in the environment variable: a list joined with commas, a boolean as
`true` / `false`, a path or a number as `str()` writes it (`5.0`), and the empty string as `""`. Cells may
wrap their value in backticks.

Metrics table (docs/serving.md, header `metric | type | labels | help`): one row per metric family that a
fresh `ServeMetrics` registry yields from `collect()` (the service's own metrics and those of the process
and platform collectors) once the offline quality metrics (`QualityMetrics`, registered when the checkpoint
folder holds an evaluation) are registered on it too, in any order. `metric` is the name as exposed on
/metrics and as queried: a counter with its `_total` suffix, an info metric with its `_info` suffix, a
histogram by its base name (its `_bucket`, `_sum` and `_count` series are implied), a summary too (its `_sum`
and `_count`), anything else by its family name. `type` is the family type that `collect()` reports
(`counter`, `gauge`, `histogram`, `summary`, `info`).
`labels` lists the label names in declaration order, comma-separated, empty when there are none; for the
collectors that declare no label names (the platform collector's `python_info`) they are the label names of
the exposed sample. `help` is the help text word for word.

Adding, removing or renaming a setting or a metric, or changing a description or help text, fails here
until docs/serving.md says the same.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from app.compress import VARIANTS
from app.compress.registry import Step
from app.serve.metrics import ServeMetrics
from app.serve.quality_metrics import QualityMetrics
from app.serve.settings import ServeSettings

ROOT = Path(__file__).parents[1]
SERVING = ROOT / "docs" / "serving.md"
COMPRESSION = ROOT / "docs" / "compression.md"
README_MAX_LINES = 200
SUFFIX = {"counter": "_total", "info": "_info"}


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table of a markdown text as rows of cells (header row first, separator row dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", stripped[1:-1])]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def table_with_header(path: Path, header: list[str]) -> list[list[str]]:
    found = [t for t in markdown_tables(path.read_text()) if [h.lower() for h in t[0]] == header]
    assert len(found) == 1, f"{path.name} must hold exactly one table with the header {header}, found {len(found)}"
    rows = found[0][1:]
    assert all(len(r) == len(header) for r in rows), f"a row of the {header} table has the wrong number of cells"
    return rows


def unquote(cell: str) -> str:
    cell = cell.strip()
    if len(cell) >= 2 and cell.startswith("`") and cell.endswith("`"):
        cell = cell[1:-1]
    return "" if cell == '""' else cell


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def as_dict(rows: list[tuple[str, ...]], what: str) -> dict[str, tuple[str, ...]]:
    names = [r[0] for r in rows]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"{what} listed twice in docs/serving.md: {twice}"
    return {r[0]: r[1:] for r in rows}


def test_settings_table_matches_serve_settings() -> None:
    prefix = ServeSettings.model_config.get("env_prefix", "")
    code = as_dict(
        [
            (
                f"{prefix}{name}".upper(),
                env_text(field.get_default(call_default_factory=True)),
                field.description or "",
            )
            for name, field in ServeSettings.model_fields.items()
        ],
        "setting",
    )
    rows = table_with_header(SERVING, ["variable", "default", "description"])
    doc = as_dict([(unquote(v), unquote(d), desc) for v, d, desc in rows], "setting")
    assert sorted(doc) == sorted(code), (
        f"settings missing from docs/serving.md: {sorted(set(code) - set(doc))}; "
        f"in docs/serving.md but not in ServeSettings: {sorted(set(doc) - set(code))}"
    )
    for name, (default, description) in code.items():
        said = doc[name]
        assert said == (default, description), f"{name}: docs/serving.md says {said}, the code says {code[name]}"


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> ServeMetrics:
    """A fresh ServeMetrics, built as app/serve/service.py builds it, from the default settings."""
    for key in [k for k in os.environ if k.upper().startswith("VAR_")]:
        monkeypatch.delenv(key)
    settings = ServeSettings()
    return ServeMetrics(settings.variants, settings.max_batch_size, settings.max_images_per_request)


def declared_labels(metrics: object) -> dict[str, tuple[str, ...]]:
    """Label names as declared, by family name, for the metrics that `metrics` (ServeMetrics, QualityMetrics)
    declares itself.

    prometheus_client exposes them only as `_labelnames`: a labelled metric with no child yet yields no
    sample, so its label names cannot be read from `collect()`.
    """
    out: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                out[family.name] = tuple(value._labelnames)
    return out


def test_metrics_table_matches_the_registry(metrics: ServeMetrics) -> None:
    labels = declared_labels(metrics) | declared_labels(QualityMetrics(metrics.registry))
    exposed = []
    for family in metrics.registry.collect():
        if family.name in labels:
            names = labels[family.name]
        else:
            names = tuple(dict.fromkeys(k for s in family.samples for k in s.labels if k not in ("le", "quantile")))
        exposed.append((family.name + SUFFIX.get(family.type, ""), family.type, ", ".join(names), family.documentation))
    code = as_dict(exposed, "metric")
    rows = table_with_header(SERVING, ["metric", "type", "labels", "help"])
    doc = as_dict(
        [
            (unquote(m), unquote(t), ", ".join(unquote(x) for x in lab.split(",") if x.strip()), h)
            for m, t, lab, h in rows
        ],
        "metric",
    )
    assert sorted(doc) == sorted(code), (
        f"metrics missing from docs/serving.md: {sorted(set(code) - set(doc))}; "
        f"in docs/serving.md but not in the registry: {sorted(set(doc) - set(code))}"
    )
    for name, row in code.items():
        assert doc[name] == row, f"{name}: docs/serving.md says {doc[name]}, the registry says {row}"


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(path: Path, spans: bool = True) -> str:
    """The text of a markdown file without its fenced code blocks (and, with `spans`, its code spans)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text) if spans else text


def links(path: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(prose(path))]


def relative_links(path: Path) -> list[str]:
    """Link and image targets that are neither URLs (`scheme:`) nor anchors within the page."""
    return [t for t in links(path) if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE) and not t.startswith("#")]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = prose(path, spans=False)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path: Path) -> None:
    missing = [t for t in relative_links(path) if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_section_links_point_at_headings(path: Path) -> None:
    """`page.md#section` (and `#section` within the page) must name a heading of that page."""
    broken = []
    for target in [*relative_links(path), *(t for t in links(path) if t.startswith("#"))]:
        file, _, anchor = target.partition("#")
        page = path.parent / file if file else path
        if anchor and page.suffix == ".md" and page.exists() and anchor not in heading_anchors(page):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to sections that do not exist: {broken}"


def test_docs_link_something() -> None:
    assert relative_links(ROOT / "README.md"), "the README links no page (the link pattern may be broken)"


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}, the rest in docs/"


def step_text(step: Step) -> str:
    """A pass as the docs write it: its name, and the options a variant sets away from their defaults."""
    if step.options is None:
        return f"`{step.spec.name}`"
    default = type(step.options)()
    changed = [
        f"{f.name}={getattr(step.options, f.name)!r}"
        for f in dataclasses.fields(step.options)  # type: ignore[arg-type]
        if getattr(step.options, f.name) != getattr(default, f.name)
    ]
    return f"`{step.spec.name}({', '.join(changed)})`" if changed else f"`{step.spec.name}`"


def test_variants_table_matches_the_registry() -> None:
    rows = table_with_header(COMPRESSION, ["variant", "purpose", "passes, in order"])
    expected = [[f"`{name}`", v.purpose, " + ".join(step_text(s) for s in v.steps)] for name, v in VARIANTS.items()]
    table = "\n".join(f"| {' | '.join(row)} |" for row in expected)
    assert rows == expected, f"docs/compression.md's variants table differs from VARIANTS; it should read:\n{table}"


def test_the_readme_names_every_variant_once() -> None:
    rows = table_with_header(ROOT / "README.md", ["variant", "passes", "purpose"])
    named = [name for row in rows for name in re.findall(r"`([^`]+)`", row[0])]
    assert sorted(named) == sorted(VARIANTS), f"README's variants table names {named}, VARIANTS {list(VARIANTS)}"
