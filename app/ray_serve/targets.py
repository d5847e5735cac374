"""Every replica's metrics, reachable by Prometheus: an HTTP endpoint per replica and a file_sd target for it.

Each replica holds its own registry (`ServeMetrics`), and `/metrics` through Ray's proxy reaches one
replica at random. So each replica also serves its registry on a port of its own: the first free one from
`first_port` upwards (9500, 9501, ... on a node with several replicas; on Kubernetes, one replica per pod
is always on `first_port`), and writes a Prometheus file_sd target file naming that address into
`targets_dir` (removed when the replica stops). Prometheus reads the files with
`file_sd_configs: [{files: ["<targets_dir>/*.json"]}]` (docker/ray/prometheus.yml).
"""

from __future__ import annotations

import errno
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

PORTS_TRIED = 64  # replicas on one node that can get a port of their own from first_port upwards
ANY_ADDRESS = ("0.0.0.0", "::", "")


@dataclass
class MetricsTarget:
    """One replica's metrics endpoint and its target file; `close` stops the one and removes the other."""

    address: str  # host:port, as Prometheus scrapes it
    file: Path | None
    server: WSGIServer
    thread: threading.Thread

    def close(self) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(
    registry: CollectorRegistry,
    *,
    bind: str,
    first_port: int,
    node_ip: str,
    targets_dir: Path | None,
    name: str,
    labels: dict[str, str],
) -> MetricsTarget:
    """Serve `registry` on `bind` at the first free port from `first_port` (0: any free port), and write the
    file_sd target `<targets_dir>/<name>.json` (no file when targets_dir is None)."""
    server, thread, port = _listen(registry, bind, first_port)
    address = f"{node_ip if bind in ANY_ADDRESS else bind}:{port}"
    file = None
    if targets_dir is not None:
        file = write_target(targets_dir / f"{name}.json", address, labels)
    return MetricsTarget(address, file, server, thread)


def _listen(registry: CollectorRegistry, bind: str, first_port: int) -> tuple[WSGIServer, threading.Thread, int]:
    ports = [0] if first_port == 0 else range(first_port, min(first_port + PORTS_TRIED, 65536))
    for port in ports:
        try:
            server, thread = start_http_server(port, addr=bind, registry=registry)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        return server, thread, server.server_port
    raise OSError(errno.EADDRINUSE, f"no free metrics port on {bind} in {first_port}..{first_port + PORTS_TRIED - 1}")


def write_target(path: Path, address: str, labels: dict[str, str]) -> Path:
    """A Prometheus file_sd file with one target, written whole (Prometheus never reads half a file). Files of
    other replicas naming the same address are removed: that address was free, so they outlived a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for other in path.parent.glob("*.json"):
        if other != path and address in _addresses(other):
            other.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps([{"targets": [address], "labels": labels}], indent=1) + "\n")
    partial.replace(path)
    return path


def read_targets(targets_dir: Path) -> list[str]:
    """Every address the target files of `targets_dir` name (what Prometheus would scrape)."""
    return [address for path in sorted(targets_dir.glob("*.json")) for address in _addresses(path)]


def _addresses(path: Path) -> list[str]:
    try:
        groups = json.loads(path.read_text())
    except (OSError, ValueError):  # gone meanwhile, or not one of ours
        return []
    if not isinstance(groups, list):
        return []
    return [address for group in groups if isinstance(group, dict) for address in group.get("targets", [])]
