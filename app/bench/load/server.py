"""Reading the server under load: its metrics, resident memory and CPU time, and its capacity."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.bench import prometheus_text
from app.bench.load.plan import ServerLimits
from app.bench.stats import median

MAX_RSS_SAMPLES = 100_000
CAPACITY_BURSTS = 3
METRICS_RETRY_S = 10.0


# ---- the server's side ---------------------------------------------------------------------------
async def metrics(client: httpx.AsyncClient) -> prometheus_text.Samples:
    """The server's samples. A 503 (uvicorn's connection limit, reached by the load this tool sends) is retried
    for METRICS_RETRY_S; any other answer but 200 raises, naming it."""
    end = time.monotonic() + METRICS_RETRY_S
    while (answer := await client.get("/metrics")).status_code == 503 and time.monotonic() < end:
        await asyncio.sleep(0.2)
    answer.raise_for_status()
    return prometheus_text.parse(answer.text)


async def rejections(client: httpx.AsyncClient) -> dict[str, float]:
    return prometheus_text.by_label(await metrics(client), "var_rejections_total", "reason")


async def server_info(client: httpx.AsyncClient) -> dict[str, str]:
    return prometheus_text.labels_of(await metrics(client), "var_model_info") or {}


def proc_rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def process_metric(client: httpx.AsyncClient, name: str) -> float | None:
    """A metric of the process collector (process_resident_memory_bytes, process_cpu_seconds_total)."""
    try:
        text = (await client.get("/metrics")).text
    except Exception:  # the sampler runs through the whole load: a missed sample is no reason to stop it
        return None
    return prometheus_text.first(prometheus_text.parse(text), name)


def proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


async def server_cpu_seconds(client: httpx.AsyncClient, pid: int | None) -> float | None:
    return proc_cpu_seconds(pid) if pid else await process_metric(client, "process_cpu_seconds_total")


@dataclass
class RssSampler:
    pid: int | None
    interval_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"/proc/{self.pid}/status VmRSS" if self.pid else "process_resident_memory_bytes"

    async def run(self, client: httpx.AsyncClient, t0: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(MAX_RSS_SAMPLES):
            rss = (
                proc_rss_bytes(self.pid) if self.pid else await process_metric(client, "process_resident_memory_bytes")
            )
            if rss is not None:
                self.samples.append((round(loop.time() - t0, 3), int(rss)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
            if stop.is_set():
                return


def rss_growth(samples: Sequence[tuple[float, int]], warmup_s: float, window_s: float, end_s: float) -> dict[str, Any]:
    """The median RSS of the first window after the warm-up against that of the last window of the run (growth
    None when the run is too short for two windows after the warm-up, or samples are missing)."""
    first = [b for t, b in samples if warmup_s <= t < warmup_s + window_s]
    last = [b for t, b in samples if end_s - window_s <= t <= end_s]
    out: dict[str, Any] = {
        "first_window_s": [warmup_s, warmup_s + window_s],
        "last_window_s": [end_s - window_s, end_s],
    }
    if not first or not last or end_s - window_s < warmup_s + window_s:
        return out | {"first_median_bytes": None, "last_median_bytes": None, "growth": None}
    a, b = median(first), median(last)
    return out | {"first_median_bytes": a, "last_median_bytes": b, "growth": b / a - 1}


# ---- capacity and the run ------------------------------------------------------------------------
async def measure_capacity(
    client: httpx.AsyncClient, variants: Sequence[str], lim: ServerLimits, n: int, limit_s: float
) -> float:
    """Images per second of one-image requests, closed loop: enough clients to fill a batch of every variant
    (never more than the queue holds), after one untimed round; the median of CAPACITY_BURSTS timed bursts of
    `n` requests: that steadies a run's own noise (one burst of 64 could be a quarter off), not the machine's
    drift between runs."""
    concurrency = max(1, min(lim.queue_capacity, lim.max_batch_size * len(variants)))

    async def burst(first: int, count: int) -> None:
        seeds = iter(range(first, first + count))

        async def worker() -> None:
            for seed in seeds:
                body = {"class_label": seed % lim.num_classes, "seed": seed, "variant": variants[seed % len(variants)]}
                r = await client.post("/generate", json=body | {"timeout_s": min(limit_s, lim.max_timeout_s)})
                if r.status_code != 200:
                    raise RuntimeError(f"capacity burst: answer {r.status_code}: {r.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def timed(first: int) -> float:
        t0 = time.perf_counter()
        await burst(first, n)
        return n / (time.perf_counter() - t0)

    async with asyncio.timeout(limit_s):
        await burst(0, concurrency)
        return median([await timed(concurrency + i * n) for i in range(CAPACITY_BURSTS)])
