"""The /metrics reader shared by the benchmarks and the tests, on the text prometheus_client writes for a
counter, a histogram, a gauge and an info metric; and `scrape` over HTTP on loopback."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from app.bench.prometheus_text import NO_LABELS, by_label, first, labels_of, parse, scrape, total, value


def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    requests = Counter("var_requests", "answers", ["variant", "status"], registry=r)
    requests.labels("baseline", "200").inc(2)
    requests.labels("litevar", "200").inc()
    requests.labels("baseline", "429").inc()
    batches = Histogram("var_batch_size_images", "batch", ["variant"], buckets=[1, 2, 4], registry=r)
    batches.labels("baseline").observe(3)
    Counter("var_rejections", "refused", ["reason"], registry=r).labels("queue_full").inc(5)
    Gauge("var_ready", "ready", registry=r).set(1)
    Info("var_model", "model", registry=r).info({"preset": "demo", "device": "cpu"})
    return r


def test_samples_are_keyed_by_name_and_label_set() -> None:
    samples = parse(generate_latest(registry()).decode())
    assert samples["var_requests_total", frozenset({("variant", "baseline"), ("status", "200")})] == 2
    assert samples["var_ready", NO_LABELS] == 1
    assert samples["var_batch_size_images_bucket", frozenset({("variant", "baseline"), ("le", "2.0")})] == 0
    assert samples["var_batch_size_images_bucket", frozenset({("variant", "baseline"), ("le", "4.0")})] == 1
    assert ("var_requests_created", frozenset({("variant", "litevar"), ("status", "200")})) in samples


def test_helpers_select_and_sum_by_label() -> None:
    samples = parse(generate_latest(registry()).decode())
    assert value(samples, "var_requests_total", variant="baseline", status="429") == 1
    assert value(samples, "var_requests_total", variant="baseline") == 0  # exact label set only
    assert value(samples, "var_requests_total", variant="bf16", status="200") == 0  # a child never used
    assert total(samples, "var_requests_total", variant="baseline") == 3  # every status
    assert total(samples, "var_requests_total", status="200") == 3  # every variant
    assert total(samples, "var_requests_total") == 4
    assert total(samples, "var_batch_size_images_sum", variant="baseline") == 3
    assert by_label(samples, "var_rejections_total", "reason") == {"queue_full": 5}
    assert labels_of(samples, "var_model_info") == {"preset": "demo", "device": "cpu"}
    assert labels_of(samples, "var_no_such_info") is None
    assert first(samples, "var_ready") == 1 and first(samples, "var_no_such_gauge") is None


class Exporter(BaseHTTPRequestHandler):
    """/metrics: the registry's text; anything else 401, as a server protecting its ops endpoints answers."""

    def do_GET(self) -> None:
        body = generate_latest(registry()) if self.path == "/metrics" else b'{"detail": "missing API key"}'
        self.send_response(200 if self.path == "/metrics" else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_scrape_reads_over_http_and_refuses_an_error_status() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        samples = scrape(f"{url}/metrics")
        assert total(samples, "var_requests_total") == 4 and first(samples, "var_ready") == 1
        with pytest.raises(httpx.HTTPStatusError, match="401"):  # not an empty set of samples
            scrape(f"{url}/protected")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
