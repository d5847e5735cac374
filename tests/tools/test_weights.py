"""`python -m app weights`: download from a loopback stand-in of the hub, verify, lay out a loadable folder."""

from __future__ import annotations

import hashlib
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from app.model.checkpoint import folder_config, load_folder, random_pipeline
from app.model.checksums import sums_mismatches
from app.model.config import PRESETS
from app.tools.released import RELEASED, ReleasedFile, ReleasedModel
from app.tools.weights import main
from tests.conftest import TINY
from tests.tools.hub_standin import COMMIT, StandInHub, standin_hub

REPO = "FoundationVision/var"
# A tiny model in the released files' format (flat state dicts saved by torch.save) beside the official
# builder's config.json, which its shape needs (a released name selects a preset only from d16 up).
NAMES = ("config.json", "var.pth", "vae.pth")
TINY_MODEL = {"tiny": ReleasedModel("var_tiny", tuple(ReleasedFile(n) for n in NAMES))}


def _saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def released_files() -> dict[str, bytes]:
    pipe = random_pipeline(PRESETS["tiny"], seed=3)
    return {
        "config.json": (TINY / "config.json").read_bytes(),
        "var.pth": _saved(pipe.var.state_dict()),
        "vae.pth": _saved(pipe.vqvae.state_dict()),
    }


@pytest.fixture
def hub(released_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    """The stand-in, named by HF_ENDPOINT only now, long after huggingface_hub read it at its import; a
    cache of this test's own."""
    with standin_hub(REPO, released_files) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield standin


def fetch(store: Path, models: dict[str, ReleasedModel] = TINY_MODEL) -> int:
    return main(["tiny", "--store", str(store)], models=models)


def test_downloads_verifies_and_lays_out_a_folder_the_service_loads(
    hub: StandInHub, tmp_path: Path, released_files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    assert hub.url != huggingface_hub.constants.ENDPOINT  # so the command must pass the endpoint itself
    store = tmp_path / "model_store"
    assert fetch(store) == 0
    folder = store / "var_tiny"
    assert [p.name for p in store.iterdir()] == ["var_tiny"]  # no staging folder left behind
    assert sorted(p.name for p in folder.iterdir()) == sorted([*NAMES, "SHA256SUMS"])
    sums = {line.split("  ")[1]: line.split("  ")[0] for line in (folder / "SHA256SUMS").read_text().splitlines()}
    assert sums == {n: hashlib.sha256(b).hexdigest() for n, b in released_files.items()}
    assert sums_mismatches(folder) == []
    pipe = load_folder(folder)
    expected = torch.load(io.BytesIO(released_files["var.pth"]), weights_only=True)
    assert torch.equal(pipe.var.state_dict()["head.weight"], expected["head.weight"])
    assert pipe.config.class_names[207] == "golden retriever"  # an official 1000-class folder: ImageNet's names
    out = capsys.readouterr().out
    assert f"{REPO} at commit {COMMIT} ({hub.url})" in out and f"verified and laid out {folder}" in out


def test_a_corrupt_download_fails_lays_out_nothing_and_is_downloaded_afresh_next_time(
    hub: StandInHub, tmp_path: Path, released_files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = bytearray(released_files["var.pth"])
    corrupt[-100] ^= 1  # one bit deep in the weights: the size is right, the content is not
    hub.serve_instead["var.pth"] = bytes(corrupt)
    store = tmp_path / "model_store"
    assert fetch(store) == 1
    err = capsys.readouterr().err
    good, bad = hashlib.sha256(released_files["var.pth"]).hexdigest(), hashlib.sha256(corrupt).hexdigest()
    assert f"error: var.pth: downloaded file is corrupt (SHA-256 {bad}, the hub reports {good})" in err
    assert not store.exists() or list(store.iterdir()) == []
    del hub.serve_instead["var.pth"]  # the transfer works again: the bad file must not come from the cache
    assert fetch(store) == 0
    assert hub.gets("var.pth") == 2 and sums_mismatches(store / "var_tiny") == []


def test_a_truncated_download_fails_and_lays_out_nothing(
    hub: StandInHub, tmp_path: Path, released_files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    full = released_files["vae.pth"]
    hub.serve_instead["vae.pth"] = full[: len(full) // 2]
    store = tmp_path / "model_store"
    assert fetch(store) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: downloading ") and "vae.pth" in err and "nothing was laid out" in err
    assert str(len(full)) in err  # the size the hub reported, against the bytes that came
    assert not store.exists() or list(store.iterdir()) == []


def test_a_folder_in_place_is_verified_and_nothing_downloaded(
    hub: StandInHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "model_store"
    assert fetch(store) == 0
    hub.requests.clear()
    assert fetch(store) == 0
    assert {method for method, _ in hub.requests} == {"HEAD"}
    assert f"already in place, verified: {store / 'var_tiny'}" in capsys.readouterr().out


def test_a_different_folder_in_the_way_is_left_as_it_is(
    hub: StandInHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "model_store" / "var_tiny"
    folder.mkdir(parents=True)
    (folder / "var.pth").write_bytes(b"mine")
    assert fetch(tmp_path / "model_store") == 1
    err = capsys.readouterr().err
    assert f"{folder} exists and does not hold these files" in err
    assert "config.json: missing" in err and "var.pth: differs from the hub's" in err
    assert sorted(p.name for p in folder.iterdir()) == ["var.pth"] and (folder / "var.pth").read_bytes() == b"mine"
    assert hub.gets("var.pth") == 0


def test_a_pinned_digest_the_hub_contradicts_stops_before_any_download(
    hub: StandInHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pinned = {"tiny": ReleasedModel("var_tiny", (ReleasedFile("config.json"), ReleasedFile("var.pth", "0" * 64)))}
    assert fetch(tmp_path / "model_store", pinned) == 1
    assert f"var.pth: the hub reports SHA-256 {hashlib.sha256(hub.files['var.pth']).hexdigest()}, pinned is" in (
        capsys.readouterr().err
    )
    assert [m for m, _ in hub.requests if m == "GET"] == []


def test_a_file_without_an_lfs_sha256_is_refused(
    hub: StandInHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.lfs = False
    assert fetch(tmp_path / "model_store") == 1
    assert "the hub reports no commit, LFS SHA-256 and size for it, so it cannot be verified" in capsys.readouterr().err


def test_an_unreachable_hub_is_a_clear_error(
    hub: StandInHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--endpoint is taken before HF_ENDPOINT, which names the working stand-in here."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    args = ["tiny", "--store", str(tmp_path / "model_store"), "--endpoint", closed]
    assert main(args, models=TINY_MODEL) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: asking {closed}/{REPO}/resolve/main/config.json for its size and SHA-256 failed")
    assert hub.requests == []


@pytest.mark.parametrize("preset", ["d16", "d20", "d24", "d30", "d36"])
def test_the_released_files_lay_out_a_folder_of_their_preset(preset: str, tmp_path: Path) -> None:
    model = RELEASED[preset]
    assert model.folder == f"var_{preset}"
    assert [f.name for f in model.files] == [f"var_{preset}.pth", "vae_ch160v4096z32.pth"]
    for f in model.files:
        (tmp_path / f.name).write_bytes(b"")
    assert folder_config(tmp_path) == PRESETS[preset]
