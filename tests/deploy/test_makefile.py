"""The Makefile's installs, read from `make -n` (nothing is installed): `make serve` installs what serving
needs, with torch's CPU build where no NVIDIA GPU is found; `make test` installs the test tools and Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def dry_run(target: str, tmp_path: Path, *, gpu: bool, **variables: str) -> list[str]:
    """The commands `make -n target` would run, on a PATH that has `sed` and, with `gpu`, an `nvidia-smi`."""
    bin_dir = tmp_path / ("bin-gpu" if gpu else "bin")
    sed = shutil.which("sed")
    assert sed is not None
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "sed").symlink_to(sed)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    make = shutil.which("make")
    assert make is not None, "make is needed"
    args = [make, "-n", "--no-print-directory", "-C", str(ROOT), target, f"VENV={tmp_path / 'venv'}"]
    args += [f"{k}={v}" for k, v in variables.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX", "MAKEFLAGS", "MFLAGS")}
    run = subprocess.run(args, env=env | {"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def pip_installs(lines: list[str]) -> list[list[str]]:
    """The arguments of each `pip install` among `lines`."""
    return [line.split("pip install", 1)[1].split() for line in lines if "-m pip install" in line]


def torch_pin() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in dependencies if d.startswith("torch=="))


def test_serve_without_a_gpu_takes_torch_from_the_cpu_index_and_no_extras(tmp_path: Path) -> None:
    torch, package = pip_installs(dry_run("serve", tmp_path, gpu=False))
    assert torch == ["--quiet", "--no-deps", f"'{torch_pin()}'", "--index-url", CPU_INDEX]
    assert package == ["--quiet", "-e", "."]  # no [dev], no [ray]


def test_serve_with_a_gpu_takes_torch_from_the_default_index(tmp_path: Path) -> None:
    torch, _ = pip_installs(dry_run("serve", tmp_path, gpu=True))
    assert torch == ["--quiet", "--no-deps", f"'{torch_pin()}'"]


@pytest.mark.parametrize("gpu", [False, True])
def test_torch_index_overrides_what_the_machine_suggests(tmp_path: Path, gpu: bool) -> None:
    cu128 = "https://download.pytorch.org/whl/cu128"
    torch, _ = pip_installs(dry_run("serve", tmp_path, gpu=gpu, TORCH_INDEX=cu128))
    assert torch[-2:] == ["--index-url", cu128]


def test_serve_and_test_keep_stamps_of_their_own(tmp_path: Path) -> None:
    serve = dry_run("serve", tmp_path, gpu=False)
    test = dry_run("pytest", tmp_path, gpu=False)
    assert f"touch {tmp_path / 'venv' / '.installed-serve'}" in serve
    assert f"touch {tmp_path / 'venv' / '.installed'}" in test
    assert pip_installs(test) == [["--quiet", "-e", "'.[dev,ray]'"]]


def test_weights_downloads_the_model_asked_for(tmp_path: Path) -> None:
    lines = dry_run("weights", tmp_path, gpu=False, MODEL="d30")
    assert lines[-1] == f"{tmp_path / 'venv' / 'bin' / 'python'} -m app weights d30 "
