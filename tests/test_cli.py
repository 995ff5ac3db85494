"""`srcompress upscale` / `eval` as a user meets them: bad input is one line and exit code 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from srcompress.cli import main as cli


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_upscale_writes_the_image_and_says_when_weights_are_random(picture, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert cli(["upscale", "edsr_mini", "--scale", "2", "--backend", "eager", str(picture), str(out)]) == 0
    assert Image.open(out).size == (64, 48)
    assert "random weights" in capsys.readouterr().err


@pytest.mark.slow
def test_upscale_with_real_weights_says_nothing_about_them(picture, tmp_path, capsys, shared_weights):
    weights = str(shared_weights / "RLFN_s_x2.pth")
    argv = ["upscale", "rlfn_s", "--scale", "2", "--weights", weights, "--backend", "eager"]
    assert cli([*argv, str(picture), str(tmp_path / "o.png")]) == 0
    assert "random weights" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["upscale", "edsr_huge", "--scale", "2", "{picture}", "{out}"], "unknown preset 'edsr_huge'"),
        (
            ["upscale", "rlfn_s", "--scale", "3", "--weights", "{weights}", "{picture}", "{out}"],
            "x2 model, but x3",
        ),
        (
            ["upscale", "rlfn_s", "--scale", "2", "--weights", "{text}", "{picture}", "{out}"],
            "cannot read notes.txt as a PyTorch checkpoint",
        ),
        (["upscale", "edsr_mini", "--scale", "2", "{text}", "{out}"], "not a readable image"),
        (["upscale", "edsr_mini", "--scale", "2", "{picture}", "{out}", "--tile", "3"], "at least 8"),
    ],
)
def test_upscale_bad_input_is_one_line(argv, message, picture, tmp_path, capsys, shared_weights):
    text = tmp_path / "notes.txt"
    text.write_text("not an image, not a checkpoint\n")
    names = {
        "picture": picture,
        "out": tmp_path / "out.png",
        "weights": shared_weights / "RLFN_s_x2.pth",
        "text": text,
    }
    assert cli([part.format(**names) for part in argv]) == 2
    err = one_error_line(capsys)
    assert err.startswith("srcompress: error:") and message in err
    assert not (tmp_path / "out.png").exists()


def test_missing_files_and_bad_scales_are_refused_by_the_parser(picture, tmp_path, capsys):
    for argv, message in (
        (
            ["upscale", "edsr_mini", "--scale", "2", str(tmp_path / "absent.png"), str(tmp_path / "o.png")],
            "no such file",
        ),
        (["eval", "bicubic", "--scale", "2", "--data", str(tmp_path / "nowhere")], "no such file"),
        (["info", "rlfn", "--scale", "5"], "invalid choice: 5"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
