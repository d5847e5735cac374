"""Every query of the Grafana dashboard, run on a real Prometheus that scrapes a real server.

`python -m app.serve` (the demo model, variants baseline and litevar, a tiny queue) and Debian's
/usr/bin/prometheus (scraping it every second, storage in a temporary folder) run on free loopback ports.
Traffic to both variants, some of it refused (422 for an invalid field and an unknown variant, 429 from a
full queue), then each panel's PromQL goes through Prometheus's /api/v1/query with the dashboard variables
substituted ($baseline=baseline, $compressed=litevar, $__rate_interval=1m). Every query must answer, with at
least one series, every value finite; a query whose series carry a variant carries both (shadow fidelity's
carry litevar, the variant scored against baseline; every litevar request is sampled); a ratio panel is
one positive number. The offline quality table reads the demo model's evaluation.json. A metric renamed in
the code leaves its queries empty, which fails here.

Prometheus comes from the Debian package that `make test` installs; without it this test fails, it never
skips. Both processes are always stopped; every wait shares one budget of BUDGET_S seconds (the test takes
15 to 25 s on 2 cores), and each HTTP call has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.bench.launcher import free_port, launched, stop_process
from tests.deploy.dashboard import (
    ROOT,
    VARIANT_VALUES,
    Query,
    load,
    metric_names,
    queries,
    referenced_variables,
    substitute,
    variable_query,
    variables,
)

pytestmark = pytest.mark.slow

PROMETHEUS = Path("/usr/bin/prometheus")
BUDGET_S = 60.0
VARIANTS = ("baseline", "litevar-eager")
VALUES = {"baseline": "baseline", "compressed": "litevar-eager", "__rate_interval": "1m"}
SCRAPE_S = 1
QUEUE_CAPACITY = 4  # images; a burst of 4-image requests overflows it
SERVER_ENV = {
    "VAR_MODEL_DIR": str(ROOT / "model_store" / "demo"),
    "VAR_VARIANTS": ",".join(VARIANTS),
    "VAR_MAX_BATCH_SIZE": "2",
    "VAR_BATCHING": "scale",  # the scale policy's panels need its series; batches are observed under both
    "VAR_WARMUP": "true",  # batch sizes 1 and 2 of two variants: under a second, and fills the memory gauges
    "VAR_QUEUE_CAPACITY": str(QUEUE_CAPACITY),
    "VAR_MAX_IMAGES_PER_REQUEST": str(QUEUE_CAPACITY),
    "VAR_DEFAULT_TIMEOUT_S": "10",
    "VAR_DRAIN_GRACE_S": "2",
    "VAR_TORCH_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "VAR_LOG_LEVEL": "warning",
    "VAR_FIDELITY_RATE": "1",  # every litevar-eager request sampled: the quality row's live panels get samples
}
FIDELITY_VARIANTS = {"litevar-eager"}  # shadow fidelity scores the variants other than its reference (baseline)
# the offline quality: the served variants that the demo model's evaluation.json has figures for, and its noise floor
EVALUATED = {r["variant"] for r in json.loads((ROOT / "model_store" / "demo" / "evaluation.json").read_text())}
EVALUATED_VARIANTS = (EVALUATED & set(VARIANTS)) | {"noise-floor"}


class Prometheus:
    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) of `expr` now; fails on any error or warning."""
        r = self.client.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", f"{expr}\n-> {r.status_code} {body}"
        assert not body.get("warnings"), f"{expr}\n-> warnings {body['warnings']}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", f"{expr}\n-> a {data['resultType']}, not an instant vector"
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        r = self.client.get(f"/api/v1/label/{label}/values", params={"match[]": match})
        assert r.status_code == 200, r.text
        values: list[str] = r.json()["data"]
        return values

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan


class Budget:
    """One time limit shared by every wait of the test."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def wait_for(self, what: str, check: Any, limit_s: float) -> None:
        end = time.monotonic() + min(limit_s, self.left())
        while not check():
            assert time.monotonic() < end, f"{what}: not within {limit_s:g} s (or the test's {BUDGET_S:g} s)"
            time.sleep(0.2)


@contextlib.contextmanager
def prometheus(target: str, folder: Path, budget: Budget) -> Iterator[Prometheus]:
    """/usr/bin/prometheus on a free loopback port, scraping `target` (host:port) every second."""
    config = folder / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\n"
        f"scrape_configs:\n  - job_name: var-serve\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = (folder / "prometheus.log").open("wb")
    args = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = Prometheus(f"http://127.0.0.1:{port}")

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}: {folder / 'prometheus.log'}"
            with contextlib.suppress(httpx.TransportError):
                return client.client.get("/-/ready").status_code == 200
            return False

        budget.wait_for("Prometheus ready", ready, 20)
        yield client
    finally:
        stop_process(proc, 10)
        log.close()


def send_traffic(url: str) -> Counter[int]:
    """Answers to both variants, two invalid requests and a burst that overflows the queue; counts by status."""
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=url, timeout=15) as client:

        def post(body: dict[str, Any]) -> int:
            return client.post("/generate", json=body).status_code

        for i in range(6):
            for variant in VARIANTS:
                statuses[post({"class_label": i % 10, "num_images": 1 + i % 2, "seed": i, "variant": variant})] += 1
        statuses.update([post({"class_label": 1, "num_images": 0}), post({"class_label": 1, "variant": "made-up"})])
        assert statuses == {200: 2 * 6, 422: 2}, statuses
        burst = [{"class_label": 2, "num_images": QUEUE_CAPACITY, "variant": v} for v in VARIANTS * 3]
        with ThreadPoolExecutor(len(burst)) as pool:
            for _ in range(3):  # 24 images at once into a queue of 4: at most 3 bursts, never more
                statuses.update(pool.map(post, burst))
                if statuses[429]:
                    break
    assert statuses[429], f"no request was refused with 429: {statuses}"
    return statuses


def check(q: Query, result: list[dict[str, Any]]) -> None:
    assert result, f"{q.name} returned no series: {q.expr}"
    for sample in result:
        value = float(sample["value"][1])
        assert math.isfinite(value), f"{q.name}: {sample['metric']} is {value}: {q.expr}"
    found = {s["metric"].get("variant") for s in result} - {None}
    names = metric_names(q.expr)
    scored = any(name.startswith("var_fidelity_") for name in names)
    offline = any(name.startswith("var_variant_quality") for name in names)
    expected = FIDELITY_VARIANTS if scored else EVALUATED_VARIANTS if offline else set(VARIANTS)
    if found or "{{variant}}" in q.legend:
        assert expected <= found, f"{q.name}: series for {sorted(found)}, not for {sorted(expected)}: {q.expr}"
    if {"baseline", "compressed"} <= referenced_variables(q.expr):
        assert len(result) == 1, f"ratio panel {q.name}: one number, not {len(result)}"
        assert float(result[0]["value"][1]) > 0, f"ratio panel {q.name}: {result[0]['value'][1]}"


def test_every_dashboard_query_answers_on_a_live_prometheus(tmp_path: Path) -> None:
    if not PROMETHEUS.exists():
        pytest.fail(
            f"{PROMETHEUS} is not installed: `make test` installs it (Debian package prometheus, in the Makefile's "
            "DEBIAN_PACKAGES); `make debian-packages` installs it alone",
            pytrace=False,
        )
    dashboard = load()
    budget = Budget(BUDGET_S)
    with (
        launched(SERVER_ENV, tmp_path / "server.log", ready_limit_s=30) as server,
        prometheus(server.url.removeprefix("http://"), tmp_path, budget) as prom,
    ):
        # the first scrape of the ready server: every counter and histogram at 0, so rate() sees the traffic
        budget.wait_for("a first scrape", lambda: prom.scalar("max(var_ready)") == 1, 15)
        statuses = send_traffic(server.url)
        answered = statuses.total()
        budget.wait_for(
            f"Prometheus seeing the {answered} answers",
            lambda: prom.scalar("sum(var_requests_total)") == answered,
            15,
        )
        budget.wait_for(
            "a litevar-eager request scored by shadow fidelity",
            lambda: prom.scalar('sum(var_fidelity_samples_total{variant="litevar-eager"})') > 0,
            15,
        )
        time.sleep(SCRAPE_S)  # one more scrape with nothing new

        for variable in variables(dashboard).values():
            query = variable_query(variable)
            assert query == VARIANT_VALUES
            metric, label = query[len("label_values(") : -1].split(", ")
            assert set(VARIANTS) <= set(prom.label_values(label, metric)), variable["name"]
        names = sorted({n for q in queries(dashboard) for n in metric_names(q.expr)})
        absent = [n for n in names if not prom.query(f"count({n})")]
        assert not absent, f"the dashboard reads metrics the server does not export: {absent}"
        for q in queries(dashboard):
            check(q, prom.query(substitute(q.expr, VALUES)))
