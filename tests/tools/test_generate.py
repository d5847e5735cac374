"""`python -m app generate`: writes the image and says where the time went."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.__main__ import main
from tests.conftest import TINY


def test_generate_from_checkpoint_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "img.png"
    assert main(["generate", "--checkpoint", str(TINY), "--class", "207", "--seed", "0", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (256, 256) and im.mode == "RGB"
        assert len(im.getcolors(maxcolors=2**24) or []) > 100  # an image, not a constant
    text = capsys.readouterr().out
    for stage in ("transformer", "sampling", "decode", "generation"):
        assert stage in text


def test_generate_random_preset_grid(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    args = ["generate", "--preset", "tiny", "--random-init", "--class", "1", "--num-images", "2", "--out", str(out)]
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.size == (512, 256)


def test_bad_class_is_an_error_message_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--checkpoint", str(TINY), "--class", "5000", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    assert "class label must be in [0, 999], got 5000" in capsys.readouterr().err


def test_python_m_app_names_its_tools_and_refuses_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    for tool in ("generate", "evaluate", "conformance", "sensitivity"):
        assert tool in err
    assert main(["--help"]) == 0


@pytest.mark.parametrize(
    "key, value", [("decoder.conv_out.bias", float("nan")), ("decoder.conv_in.bias", float("inf"))]
)  # the infinite bias turns into NaN at the decoder's first normalisation
def test_non_finite_output_is_refused_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: float
) -> None:
    """A checkpoint whose decoder gives NaN pixels: the server answers 500 for such images, so the command
    line must not save them as a PNG either."""
    broken = tmp_path / "broken"
    shutil.copytree(TINY, broken, ignore=shutil.ignore_patterns("reference.pt"))
    vae = torch.load(broken / "vae.pth", weights_only=True)
    vae[key][0] = value
    torch.save(vae, broken / "vae.pth")
    out = tmp_path / "img.png"
    args = ["generate", "--checkpoint", str(broken), "--class", "207", "--num-images", "2", "--out", str(out)]
    assert main(args) == 1
    assert not out.exists()
    captured = capsys.readouterr()
    assert "non-finite output (NaN or infinite pixels) in 2 of 2 image(s) (seeds 0, 1)" in captured.err
    assert f"{out} not written" in captured.err and "wrote" not in captured.out
