"""The conformance command against outputs of the official code (shipped in tests/data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from app.tools.conformance import main
from tests.conftest import SHARED_ALN, TINY


@pytest.mark.slow
@pytest.mark.parametrize("folder", [TINY, SHARED_ALN], ids=["depth2", "depth3_shared_aln"])
def test_shipped_fixture_passes_every_check(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(folder)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "conformance: 25/25 checks passed"
    assert sum(line.startswith("PASS") for line in out) == 25


@pytest.mark.slow
def test_perturbed_weights_fail_with_exit_status_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "fixture"
    shutil.copytree(TINY, folder)
    sd = torch.load(folder / "var.pth", weights_only=True)
    sd["blocks.1.ffn.fc2.bias"] = sd["blocks.1.ffn.fc2.bias"] + 0.01
    torch.save(sd, folder / "var.pth")
    assert main([str(folder), "--checks", "greedy,teacher_forced,vqvae"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  greedy guided logits" in out
    assert "PASS  vqvae tokens" in out  # the VQVAE is untouched
    assert out.strip().splitlines()[-1].startswith("conformance: ")
    assert not out.strip().endswith("17/17 checks passed")


def test_unknown_check_group_is_refused() -> None:
    with pytest.raises(SystemExit):
        main([str(TINY), "--checks", "greedy,nonsense"])
