"""`python -m app generate`: writes the image and says where the time went."""

from __future__ import annotations

from pathlib import Path

import pytest
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
