"""Process memory readings: peak resident set size (resettable on Linux) and peak GPU memory, and the peak
above the start of a section of code (`peak_above_start`)."""

from __future__ import annotations

import contextlib
import itertools
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def reset_peak(device: str | torch.device = "cpu") -> None:
    """Start a new peak-RSS window (Linux `clear_refs` 5 resets VmHWM) and a new CUDA peak."""
    _reset_peak_rss()  # not Linux or not permitted: the peak then covers the whole process
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set; False where that is not possible (not Linux, not permitted)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakReading:
    bytes: int | None = None  # None: not measured (the section raised, or nothing to measure with here)


@contextlib.contextmanager
def peak_above_start(device: str | torch.device) -> Iterator[PeakReading]:
    """The most memory held during the section above what was held when it started, read when it ends.

    On CUDA: allocated device memory (`torch.cuda.max_memory_allocated`, whose peak this resets). Elsewhere:
    the process's resident set (VmHWM, reset through /proc/self/clear_refs; Linux only, else not measured).
    The resident set is process-wide (other threads count too) and a lower bound of what the section
    allocated: memory that the allocator reuses from earlier sections adds nothing to it."""
    reading = PeakReading()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield reading
        torch.cuda.synchronize(dev)
        reading.bytes = torch.cuda.max_memory_allocated(dev) - start
        return
    rss_start = rss_bytes() if _reset_peak_rss() else None
    yield reading
    peak = _status_kib("VmHWM") * 1024
    if rss_start is not None and peak:
        reading.bytes = max(0, peak - rss_start)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes(device: str | torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of the weights the modules hold: the distinct storages behind their parameters and buffers, plus
    weights kept outside them (a submodule's `packed_bytes`, e.g. an int8 kernel's packed weight)."""
    storages: dict[int, int] = {}
    packed = 0
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        packed += sum(int(getattr(sub, "packed_bytes", 0)) for sub in m.modules())
    return sum(storages.values()) + packed
