"""An independent load tool beside our own client: `hey` (the Debian package of the same name), run against
the same server with the same request, so that the serving benchmark's figures can be checked against a
client that shares none of our code (its own HTTP stack, connection reuse and clock)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Any

from app.bench.stats import median


@dataclass(frozen=True)
class HeyRun:
    requests_per_s: float  # requests over the time from the first start to the last answer
    median_s: float  # of the response times
    statuses: dict[int, int]  # status code -> responses


def available() -> bool:
    return shutil.which("hey") is not None


def run(
    url: str, body: dict[str, Any], requests: int, concurrency: int, timeout_s: int = 120, expect: int = 200
) -> HeyRun:
    """POST `body` to `url` `requests` times from `concurrency` workers; RuntimeError on any answer but `expect`."""
    command = ["hey", "-n", str(requests), "-c", str(concurrency), "-t", str(timeout_s), "-m", "POST", "-o", "csv"]
    command += ["-T", "application/json", "-d", json.dumps(body), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30 * timeout_s).stdout
    result = parse(out)
    if set(result.statuses) != {expect}:
        raise RuntimeError(f"hey: answers other than {expect}: {result.statuses}")
    return result


def parse(csv_text: str) -> HeyRun:
    """hey's per-request CSV (`-o csv`): its summary's percentiles are wrong for small counts (hey 0.1.4 prints
    "0% in 0.0000 secs" for those it skips), so the figures are computed here from every request's row."""
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    if not rows or "response-time" not in rows[0]:
        raise ValueError(f"hey printed no per-request rows:\n{csv_text[-2000:]}")
    times = [float(r["response-time"]) for r in rows]
    span = max(float(r["offset"]) + t for r, t in zip(rows, times, strict=True))
    return HeyRun(len(rows) / span, median(times), dict(Counter(int(r["status-code"]) for r in rows)))
