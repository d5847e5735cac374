"""`python -m app.bench refusals`: the server's CPU time per refused POST /generate, its queue held full.

Under overload most requests are refusals, and each one's CPU comes out of the batch being computed. Here the
service runs in this process, under uvicorn configured as `python -m app.serve` configures it; once its
default variant serves, its engine reports a full queue, so every request is refused as under overload
without any image computed. `hey` (a Debian package) sends the requests from its own process: the CPU that
this process spends during a round, over the requests answered, is the server's cost of one refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import uvicorn

from app.bench import hey
from app.bench.launcher import free_port, wait_ready
from app.bench.stats import median
from app.serve.__main__ import uvicorn_config
from app.serve.app import create_app
from app.serve.settings import ServeSettings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app.bench refusals", description=__doc__)
    ap.add_argument("--model-dir", type=Path, help="the served model (default: the service's default)")
    ap.add_argument("--requests", type=int, default=4000, help="per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    return ap.parse_args(argv)


def started(settings: ServeSettings) -> tuple[uvicorn.Server, threading.Thread, str]:
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    wait_ready(url)
    engine = app.state.service.engine
    engine.queued_images = lambda: engine.queue_capacity  # full from now on: every request is refused
    return server, thread, url


def cpu_per_refusal_us(url: str, requests: int, concurrency: int) -> float:
    """This process's CPU time during one hey round, per request; every answer must be 429."""
    before = time.process_time()
    run = hey.run(f"{url}/generate", {"class_label": 0}, requests, concurrency, expect=429)
    return (time.process_time() - before) / sum(run.statuses.values()) * 1e6


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not hey.available():
        raise SystemExit("hey is not installed (Debian: apt-get install hey)")
    settings = ServeSettings(host="127.0.0.1", port=free_port(), variants=["baseline"], warmup=False)
    if a.model_dir:
        settings = settings.model_copy(update={"model_dir": a.model_dir})
    server, thread, url = started(settings)
    try:
        cpu_per_refusal_us(url, min(500, a.requests), a.concurrency)  # untimed: connections, caches
        rounds = [cpu_per_refusal_us(url, a.requests, a.concurrency) for _ in range(a.rounds)]
    finally:
        server.should_exit = True
        thread.join(30)
    record = {"cpu_per_refusal_us": median(rounds), "rounds_us": rounds, "requests": a.requests, "cpus": os.cpu_count()}
    print(json.dumps(record, indent=1))
    return 0
