"""`python -m app gpu-check` (`make gpu-check`): what a lent GPU machine runs in a few minutes.

1. The device: its name, compute capability, and torch's CUDA version.
2. Conformance on the device: the official fixtures' greedy tokens and logits, teacher-forced logits and VQVAE
   outputs against the official code's references (`python -m app conformance`, groups greedy,
   teacher_forced and vqvae; the sampled references are a CPU random stream, so they stay out).
3. Memory: a batch's measured peak (`peak_above_start`: the CUDA allocator's peak) holds at least the KV cache
   the pipeline allocated for it. On the CPU the peak is the resident set's growth, which memory reused from
   the warm-up does not show, so there it is reported, not checked.
4. The benchmark: `python -m app.bench` on random weights of `--preset` (d16) at `--batch-size` (8) for
   `--variants` (baseline, which runs bfloat16 autocast on a GPU, litevar and fastest).
5. The batching policies: `python -m app.bench policies` at the same shape, `whole` against `scale` under
   Poisson loads of 50% and 90% (`--policy-requests` requests each), `--policy-variants` (`baseline` and
   `litevar`): on a GPU a step is launch-bound, where joining a running generation may be nearly free (on CPU
   it is not).

Writes one JSON and exits 1 when a check fails. `--device cpu --preset tiny` runs the same steps on the CPU,
which is how `make test` keeps this script working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from app.bench import offline, policies
from app.model.checkpoint import open_pipeline
from app.model.memory import peak_above_start
from app.tools.conformance import run_conformance

FIXTURES = "tests/data/var_official_tiny,tests/data/var_official_shared_aln"
GROUPS = ["greedy", "teacher_forced", "vqvae"]


def device_facts(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.device(device).type == "cuda":
        facts |= {"name": torch.cuda.get_device_name(device), "capability": torch.cuda.get_device_capability(device)}
    return facts


def conformance(folders: list[Path], device: str) -> dict[str, Any]:
    out = {}
    for folder in folders:
        results = run_conformance(folder, GROUPS, device)
        failed = [r.name for r in results if not r.passed]
        out[folder.name] = {"checks": len(results), "failed": failed, "passed": bool(results) and not failed}
    return out


def memory(preset: str, device: str, batch_size: int) -> dict[str, Any]:
    pipe = open_pipeline(None, preset, True).to(device)
    labels, seeds = [i % pipe.num_classes for i in range(batch_size)], list(range(batch_size))
    pipe.generate(labels, seeds=seeds)  # warm-up: kernels, allocator
    with peak_above_start(device) as peak:
        gen = pipe.generate(labels, seeds=seeds)
    if torch.device(device).type == "cuda":
        ok = peak.bytes is not None and peak.bytes >= gen.kv_cache_bytes > 0
    else:
        ok = gen.kv_cache_bytes > 0
    return {"batch_size": batch_size, "peak_bytes": peak.bytes, "kv_cache_bytes": gen.kv_cache_bytes, "passed": ok}


def benchmark(a: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="var-gpu-check-") as tmp:
        out = Path(tmp) / "bench.json"
        argv = ["--preset", a.preset, "--variants", a.variants, "--batch-sizes", str(a.batch_size)]
        argv += ["--runs", str(a.runs), "--device", a.device, "--json", str(out)]
        if offline.main(argv) != 0:
            raise RuntimeError(f"python -m app.bench {' '.join(argv)} failed")
        records: list[dict[str, Any]] = json.loads(out.read_text())
        return records


def batching_policies(a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="var-gpu-check-") as tmp:
        out = Path(tmp) / "policies.json"
        argv = ["--preset", a.preset, "--variants", a.policy_variants, "--device", a.device]
        argv += ["--max-batch-size", str(a.batch_size), "--requests", str(a.policy_requests)]
        argv += ["--capacity-requests", str(a.policy_requests), "--policies", "whole,scale", "--json", str(out)]
        if policies.main(argv) != 0:
            raise RuntimeError(f"python -m app.bench policies {' '.join(argv)} failed")
        record: dict[str, Any] = json.loads(out.read_text())
        return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m app gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fixtures", default=FIXTURES, help="comma-separated folders made by the official code")
    ap.add_argument("--preset", default="d16", help="model shape of the memory check and the benchmark")
    ap.add_argument("--variants", default="baseline,litevar,fastest")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--policy-requests", type=int, default=200, help="per load of the batching policies")
    ap.add_argument("--policy-variants", default="baseline,litevar", help="the variants the batching policies serve")
    ap.add_argument("--json", type=Path, default=Path("runs/gpu-check.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {a.device}, but torch sees no CUDA device", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"device": device_facts(a.device)}
    report["conformance"] = conformance([Path(f) for f in a.fixtures.split(",") if f], a.device)
    report["memory"] = memory(a.preset, a.device, a.batch_size)
    report["benchmark"] = benchmark(a)
    report["batching_policies"] = batching_policies(a)
    failed = [name for name, c in report["conformance"].items() if not c["passed"]]
    failed += [] if report["memory"]["passed"] else ["memory"]
    report["failed"] = failed
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1))
    print(f"gpu-check on {a.device}: {'failed: ' + ', '.join(failed) if failed else 'all checks passed'}; {a.json}")
    return 1 if failed else 0
