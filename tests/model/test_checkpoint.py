"""Checkpoint loading: strict keys and shapes, safe unpickling, safetensors, folder layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.model.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    folder_config,
    load_folder,
    load_pipeline,
    read_state_dict,
)
from app.model.checksums import write_sums
from app.model.config import PRESETS, config_from_official
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from tests.conftest import TINY

GREEDY = SamplingParams(cfg=4.0, top_k=1, top_p=0.0)


def test_tiny_preset_matches_the_fixture_strictly() -> None:
    pipe = load_pipeline(PRESETS["tiny"], TINY / "var.pth", TINY / "vae.pth")
    assert pipe.config.var.depth == 2 and pipe.config.vqvae.ch == 32


def test_every_missing_unexpected_and_misshapen_key_is_named(tmp_path: Path) -> None:
    sd = torch.load(TINY / "var.pth", weights_only=True)
    del sd["head.bias"], sd["blocks.0.attn.q_bias"]
    sd["blocks.7.extra"] = torch.zeros(3)
    sd["word_embed.weight"] = torch.zeros(128, 16)
    torch.save(sd, tmp_path / "var.pth")
    with pytest.raises(CheckpointMismatch) as err:
        load_pipeline(PRESETS["tiny"], tmp_path / "var.pth", TINY / "vae.pth")
    e = err.value
    assert sorted(e.missing) == ["blocks.0.attn.q_bias", "head.bias"]
    assert e.unexpected == ["blocks.7.extra"]
    assert e.misshapen == [("word_embed.weight", (128, 32), (128, 16))]
    text = str(e)
    assert "'tiny'" in text and "VAR" in text
    for key in ("head.bias", "blocks.0.attn.q_bias", "blocks.7.extra", "word_embed.weight"):
        assert key in text


def test_checkpoint_of_another_preset_is_rejected_naming_that_preset() -> None:
    with pytest.raises(CheckpointMismatch) as err:
        load_pipeline(PRESETS["d16"], TINY / "var.pth", TINY / "vae.pth")
    assert err.value.preset == "d16"
    assert any(k == "pos_1LC" for k, _, _ in err.value.misshapen)
    assert len(err.value.missing) > 100  # blocks 2..15


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(_Payload.marker),))

    marker = Path("/nonexistent")


def test_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    _Payload.marker = tmp_path / "executed"
    torch.save({"head.bias": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        read_state_dict(tmp_path / "evil.pth")
    assert not _Payload.marker.exists()


@pytest.mark.parametrize(
    "obj, message",
    [([1, 2, 3], "not a state dict"), ({"trainer": {"step": 3}, "w": torch.zeros(1)}, "not a flat state dict")],
)
def test_non_state_dict_files_are_refused(tmp_path: Path, obj: object, message: str) -> None:
    torch.save(obj, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(tmp_path / "x.pth")


def test_garbage_file_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_state_dict(tmp_path / "x.pth")


def test_safetensors_folder_gives_the_same_images(tmp_path: Path, tiny_pipeline: VARPipeline) -> None:
    for name in ("var", "vae"):
        sd = torch.load(TINY / f"{name}.pth", weights_only=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    pipe = load_folder(tmp_path)
    a = pipe.generate([207], GREEDY, seeds=[0])
    b = tiny_pipeline.generate([207], GREEDY, seeds=[0])
    assert torch.equal(a.images, b.images)


def test_our_config_json_round_trips(tmp_path: Path) -> None:
    cfg = config_from_official(json.loads((TINY / "config.json").read_text()), name="tiny")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert folder_config(tmp_path) == cfg == PRESETS["tiny"]


def test_released_file_names_select_the_preset(tmp_path: Path) -> None:
    (tmp_path / "var_d20.pth").write_bytes(b"")
    (tmp_path / "vae_ch160v4096z32.pth").write_bytes(b"")
    assert folder_config(tmp_path) == PRESETS["d20"]


def test_folder_without_weights_names_what_it_looked_for(tmp_path: Path) -> None:
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"var\.safetensors"):
        load_folder(tmp_path)


def test_a_folder_is_checked_against_its_sha256sums_naming_every_file_that_differs(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    write_sums(folder)
    load_folder(folder)  # intact: loads
    with (folder / "var.pth").open("r+b") as f:  # one flipped byte deep inside the weights
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 1]))
    (folder / "reference.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        load_folder(folder)
    assert "var.pth: SHA-256 differs from SHA256SUMS" in str(err.value)
    assert "reference.pt: listed in SHA256SUMS, missing" in str(err.value)
    assert "vae.pth" not in str(err.value)
