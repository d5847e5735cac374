"""Process memory readings: peak resident set size (resettable on Linux) and peak GPU memory."""

from __future__ import annotations

import contextlib
import itertools
import resource
from pathlib import Path

import torch
from torch import nn


def reset_peak(device: str | torch.device = "cpu") -> None:
    """Start a new peak-RSS window (Linux `clear_refs` 5 resets VmHWM) and a new CUDA peak."""
    # not Linux or not permitted: the peak then covers the whole process
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


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
