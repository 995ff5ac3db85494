"""The compression pipeline end to end on tiny data: every artifact, kill + resume, bad configs.

The teacher is the real RLFN-S ×2 from ../shared/weights; the images are small crops of the bundled
sample set, so each run takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from core.data.sample import sample_dir
from core.errors import UserError
from core.job import STAGES, CompressionReport, JobConfig
from core.pipeline import run_pipeline
from srcompress.cli import main as cli

TINY = dict(
    prune_iters=6,
    distill_iters=8,
    batch_size=2,
    patch_size=16,
    validate_every=4,
    checkpoint_every=2,
    target_params=20000,
)


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    """Four 64x48 HR crops of the sample images (a train set and a val set in one)."""
    source = sample_dir(tmp_path_factory.mktemp("cache"))
    folder = tmp_path_factory.mktemp("tiny")
    for path in sorted(source.glob("*.png"))[:4]:
        image = np.asarray(Image.open(path).convert("RGB"))[:48, :64]
        Image.fromarray(image).save(folder / path.name)
    return folder


@pytest.fixture(scope="module")
def teacher(shared_weights) -> Path:
    return shared_weights / "RLFN_s_x2.pth"


def tiny_config(teacher: Path, images: Path, **changes) -> JobConfig:
    return JobConfig(
        model="rlfn_s",
        scale=2,
        teacher_weights=teacher,
        train_data=[images],
        val_data=[images],
        device="cpu",
        **{**TINY, **changes},
    )


@pytest.mark.slow
def test_tiny_run_produces_every_artifact(tmp_path, teacher, tiny_images):
    events = []
    report = run_pipeline(
        tiny_config(teacher, tiny_images),
        tmp_path,
        on_progress=lambda stage, fraction, metrics: events.append((stage, fraction)),
    )
    out = tmp_path / "out"
    for name in (
        "model.safetensors",
        "config.json",
        "model.onnx",
        "MODEL_CARD.md",
        "report.json",
        "psnr_vs_params.png",
        "crops.png",
        "pipeline.log",
    ):
        assert (out / name).stat().st_size > 0, name
    # stages report in order, each ending at 1.0
    stages = list(dict.fromkeys(stage for stage, _ in events))
    assert stages == list(STAGES)
    assert all(any(s == stage and f == 1.0 for s, f in events) for stage in stages)

    saved = CompressionReport.model_validate_json((out / "report.json").read_text())
    assert saved.student.params == report.student.params <= 20000
    assert saved.teacher.params == 454_620
    assert saved.compress.budget is not None and saved.compress.budget.cost <= 20000
    assert saved.pruning_ineffective  # 6 steps of λ = 1e-4 leave d ≈ 1
    assert 0.99 < saved.prune.density <= 1.0
    assert saved.teacher.scores[0].psnr > saved.bicubic[0].psnr  # the real teacher beats bicubic
    assert saved.export.onnx_max_abs_diff < 1e-4
    assert saved.distill.iterations == 8 and len(saved.distill.val_curve) == 2
    assert set(saved.stage_seconds) == set(STAGES)
    assert [f.name for f in saved.quantize.formats] == ["onnx"] and saved.quantize.formats[0].ok
    assert "Apache-2.0" in (out / "MODEL_CARD.md").read_text()


def _cli_compress(teacher: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "srcompress", "compress", "rlfn_s", "--scale", "2", "--teacher", str(teacher),
        "--train", str(images), "--val", str(images), "--target-params", "20000",
        "--prune-iters", "6", "--distill-iters", "40", "--batch-size", "2", "--patch-size", "16",
        "--validate-every", "20", "--checkpoint-every", "2", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--overparam", "2")], ids=["plain", "overparam"])
def test_killed_run_resumes_to_bit_identical_weights(tmp_path, teacher, tiny_images, extra):
    """Over-parameterized training checkpoints the expanded weights; the resumed run must re-expand the
    student before it loads them and fold it after, exactly as the uninterrupted run does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same kernels in every process
    reference = tmp_path / "reference"
    subprocess.run(
        _cli_compress(teacher, tiny_images, reference, *extra), check=True, env=env, capture_output=True
    )

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(_cli_compress(teacher, tiny_images, resumed, *extra), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = resumed / "distilling.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)  # polling, not a delay that decides anything
    process.send_signal(signal.SIGSTOP)  # frozen at once: whatever it saved last is where it resumes
    assert process.poll() is None, "the run finished before it could be stopped"
    process.send_signal(signal.SIGKILL)
    process.wait()
    import torch

    stopped_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 0 < stopped_at < 40
    assert not (resumed / "out" / "report.json").exists()

    run = subprocess.run(
        _cli_compress(teacher, tiny_images, resumed, *extra, "--resume"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    state = json.loads((resumed / "state.json").read_text())
    assert state["results"]["distilling"]["iterations"] == 40
    recorded = CompressionReport.model_validate_json((resumed / "out" / "report.json").read_text())
    assert recorded.recipe.overparam == (2.0 if extra else 0.0)
    a = load_file(reference / "out" / "model.safetensors")
    b = load_file(resumed / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a), "resumed weights differ from the uninterrupted run"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lambda", "0"], "lambda"),
        (["--lambda", "-1"], "lambda"),
        (["--alpha", "-0.1"], "alpha"),
        (["--patch-size", "20"], "patch_size"),
    ],
)
def test_bad_numbers_are_rejected_before_work(tmp_path, teacher, tiny_images, capsys, flags, message):
    argv = _cli_compress(teacher, tiny_images, tmp_path / "run")[3:]
    argv = [a for a in argv if a not in ("--target-params", "20000")] + flags
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("srcompress: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"), [(["--iters", "0"], "iterations"), (["--batch-size", "0"], "batch_size")]
)
def test_train_rejects_bad_numbers_in_one_line(tmp_path, tiny_images, capsys, flags, message):
    argv = ["train", "rlfn_s", "--scale", "2", "--train", str(tiny_images), "--val", str(tiny_images)]
    argv += ["--iters", "1", "--out", str(tmp_path / "run"), *flags]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("srcompress: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_wrong_teacher_and_empty_data_are_rejected(tmp_path, shared_weights, tiny_images, capsys):
    base = dict(prune_iters=1, distill_iters=1)
    wrong_scale = tiny_config(shared_weights / "RLFN_s_x4.pth", tiny_images, **base)
    with pytest.raises(UserError, match="x4 model, but x2"):
        run_pipeline(wrong_scale, tmp_path / "a")
    wrong_family = tiny_config(shared_weights / "RLFN_s_x2.pth", tiny_images, **base).model_copy(
        update={"model": "edsr_baseline"}
    )
    with pytest.raises(UserError, match="(?i)family|edsr"):
        run_pipeline(wrong_family, tmp_path / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="(?i)no image|empty"):
        run_pipeline(tiny_config(shared_weights / "RLFN_s_x2.pth", empty, **base), tmp_path / "c")
    for name in ("a", "b", "c"):
        assert not (tmp_path / name / "state.json").exists()
