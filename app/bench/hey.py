"""An independent load tool beside our own client: `hey` (the Debian package of the same name), run against
the same server with the same request, so that the serving benchmark's figures can be checked against a
client that shares none of our code (its own HTTP stack, connection reuse and clock)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HeyRun:
    requests_per_s: float
    median_s: float | None  # hey's "50% in" line; None when it printed no distribution
    statuses: dict[int, int]  # status code -> responses


def available() -> bool:
    return shutil.which("hey") is not None


def run(url: str, body: dict[str, Any], requests: int, concurrency: int, timeout_s: int = 120) -> HeyRun:
    """POST `body` to `url` `requests` times from `concurrency` workers; RuntimeError on any answer but 200."""
    command = ["hey", "-n", str(requests), "-c", str(concurrency), "-t", str(timeout_s), "-m", "POST"]
    command += ["-T", "application/json", "-d", json.dumps(body), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30 * timeout_s).stdout
    result = parse(out)
    if set(result.statuses) != {200}:
        raise RuntimeError(f"hey: answers other than 200: {result.statuses}")
    return result


def parse(text: str) -> HeyRun:
    """hey's summary: `Requests/sec:`, the latency distribution's `50% in S secs`, the status counts."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rate is None:
        raise ValueError(f"hey printed no Requests/sec line:\n{text[-2000:]}")
    median = re.search(r"50% in ([\d.]+) secs", text)
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    return HeyRun(float(rate.group(1)), float(median.group(1)) if median else None, statuses)
