"""Every replica's metrics endpoint and its Prometheus file_sd target (no Ray needed)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from app.ray_serve.targets import PORTS_TRIED, MetricsTarget, read_targets, serve_metrics, write_target

LABELS = {"ray_app": "var-serve", "ray_deployment": "var-serve", "ray_replica": "abc"}


@pytest.fixture
def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("var_test_total", "a counter of this test", registry=r).inc(3)
    return r


@pytest.fixture
def target(registry: CollectorRegistry, tmp_path: Path) -> Iterator[MetricsTarget]:
    t = serve_metrics(
        registry, bind="127.0.0.1", first_port=0, node_ip="192.0.2.1", targets_dir=tmp_path, name="r1", labels=LABELS
    )
    try:
        yield t
    finally:
        t.close()


def test_the_target_file_names_the_endpoint_that_serves_the_registry(target: MetricsTarget, tmp_path: Path) -> None:
    assert target.file == tmp_path / "r1.json"
    assert json.loads(target.file.read_text()) == [{"targets": [target.address], "labels": LABELS}]
    assert read_targets(tmp_path) == [target.address]
    text = httpx.get(f"http://{target.address}/metrics", timeout=5).text
    assert "var_test_total 3.0" in text


def test_closing_removes_the_target_file_and_stops_the_endpoint(target: MetricsTarget, tmp_path: Path) -> None:
    target.close()
    assert read_targets(tmp_path) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{target.address}/metrics", timeout=2)


def test_a_taken_port_moves_the_replica_to_a_later_one(registry: CollectorRegistry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t = serve_metrics(
            registry, bind="127.0.0.1", first_port=port, node_ip="x", targets_dir=None, name="r", labels={}
        )
        try:
            host, _, got = t.address.rpartition(":")
            # the next free one: port + 1 unless something else holds that too
            assert host == "127.0.0.1" and port < int(got) < port + PORTS_TRIED and t.file is None
            assert "var_test_total 3.0" in httpx.get(f"http://{t.address}/metrics", timeout=5).text
        finally:
            t.close()


def test_an_endpoint_on_every_address_is_named_by_the_node_ip(registry: CollectorRegistry, tmp_path: Path) -> None:
    t = serve_metrics(
        registry, bind="0.0.0.0", first_port=0, node_ip="192.0.2.1", targets_dir=None, name="r", labels={}
    )
    try:
        assert t.address.startswith("192.0.2.1:")
    finally:
        t.close()


def test_a_target_file_left_by_a_crashed_replica_on_the_same_address_is_replaced(tmp_path: Path) -> None:
    write_target(tmp_path / "crashed.json", "10.0.0.1:9500", {})
    write_target(tmp_path / "other-node.json", "10.0.0.2:9500", {})
    write_target(tmp_path / "new.json", "10.0.0.1:9500", {})
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["new.json", "other-node.json"]
    assert not list(tmp_path.glob(".*"))  # no partial file left behind
