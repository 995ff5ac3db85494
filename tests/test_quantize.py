"""Deployable formats (core.quantize): every format of the real RLFN-S ×2 teacher and of a ~45K student
built, run and verified on Set5 against fp32; the job contract refuses what a family cannot hold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from core.data.datasets import load_images
from core.formats import FORMATS
from core.job import JobConfig, JobParams
from core.models.build import create_model
from core.pipeline import run_pipeline
from core.quantize.stage import QuantizeConfig, run_quantize
from srcompress.cli import main as cli

FP16_FLOOR_DB = 50.0  # parity of an fp16 format with fp32 (issue 13)
TEACHER_INT8_COST_DB = 0.10  # what an int8 teacher may lose in PSNR-Y on Set5 (issue 13)


def check_floors(formats: list[dict], int8_cost: float) -> None:
    by_name = {f["name"]: f for f in formats}
    assert set(by_name) == set(FORMATS), by_name.keys()
    for f in formats:
        assert f["ok"], f
        assert f["bytes"] > 0 and f["latency_ms"] > 0 and f["psnr"] > 30, f
        if f["precision"] == "fp32":
            assert f["parity_db"] >= 80 and abs(f["quality_cost_db"]) < 1e-3, f
        if f["precision"] == "fp16":
            assert f["parity_db"] >= FP16_FLOOR_DB, f
        if f["precision"] == "int8":
            assert f["quality_cost_db"] <= int8_cost, f
            assert f["parity_db"] >= 45, f


@pytest.mark.slow
def test_quantize_cli_gives_every_format_of_the_teacher_within_its_floor(
    shared_data, shared_weights, tmp_path, capsys
):
    out = tmp_path / "teacher"
    argv = ["quantize", str(shared_weights / "RLFN_s_x2.pth"), "--preset", "rlfn_s", "--scale", "2"]
    argv += ["--val", str(shared_data / "benchmark" / "Set5"), "--out", str(out), "--calibration", "minmax"]
    argv += ["--latency-size", "160x90"]
    argv += [
        "--calib",
        str(shared_data / "train" / "DIV2K_test_LRx4"),
        str(shared_data / "train" / "T91_partial53"),
    ]
    assert cli(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "quantize.json").read_text())
    check_floors(result["formats"], TEACHER_INT8_COST_DB)
    assert result["calibration"]["method"] == "minmax" and result["calibration"]["patches"] == 128
    for spec in FORMATS.values():
        assert all((out / name).is_file() for name in spec.files), spec
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    printed = capsys.readouterr().out
    assert "onnx_int8" in printed and "not offered" not in printed


@pytest.mark.slow
def test_a_job_asking_for_every_format_builds_and_verifies_them_for_its_45k_student(
    shared_data, shared_weights, tmp_path
):
    config = JobConfig(
        model="rlfn_s",
        scale=2,
        teacher_weights=shared_weights / "RLFN_s_x2.pth",
        train_data=[shared_data / "train" / "T91_partial53"],
        val_data=[shared_data / "benchmark" / "Set5"],
        target_params=45_000,
        prune_iters=4,
        distill_iters=300,
        validate_every=0,
        formats=list(FORMATS),
        calibration="minmax",
        calibration_patches=64,
    )
    report = run_pipeline(config, tmp_path / "job")
    assert report.student.params <= 45_000 and report.recipe.student_init == "inherit"
    formats = [f.model_dump() for f in report.quantize.formats]
    # A student of a few hundred steps: int8 is held to the stage's own floor.
    check_floors(formats, int8_cost=0.30)
    assert report.quantize.calibration.source == ["T91_partial53"]
    out = tmp_path / "job" / "out"
    assert "## Deployable formats" in (out / "MODEL_CARD.md").read_text()
    assert {"model_int8.onnx", "model_openvino_int8.xml", "model_fp16.ncnn.param"} <= set(report.artifacts)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "swinir_lightweight", "formats": ["onnx_int8"]}, "swinir cannot be exported as onnx_int8"),
        ({"model": "rlfn_s", "student_preset": "swinir_mini", "formats": ["ncnn"]}, "swinir cannot be"),
        ({"model": "rlfn_s", "formats": ["onnx", "onnx"]}, "lists a format twice"),
        ({"model": "rlfn_s", "formats": ["tensorrt"]}, "formats"),
    ],
)
def test_the_job_contract_refuses_formats_a_family_cannot_hold(fields, message):
    with pytest.raises(ValidationError, match=message):
        JobParams(scale=2, **fields)


def test_a_job_asks_for_fp32_onnx_only_by_default():
    params = JobParams(model="rlfn_s", scale=2)
    assert params.formats == ["onnx"] and params.calibration == "percentile"


def test_quantize_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    missing = ["quantize", str(tmp_path / "none.pth"), "--val", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        cli(missing)
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli(["quantize", str(tmp_path), "--val", str(tmp_path), "--out", str(tmp_path), "--formats", "trt"])
    err = capsys.readouterr().err
    assert "unknown format ['trt']" in err and "Traceback" not in err


def test_swinir_gets_fp32_onnx_mixed_fp16_and_openvino_served_in_tiles(tmp_path):
    """SwinIR's graphs hold one input size: a smaller image is padded up to it, a larger one tiled."""
    torch.manual_seed(0)
    model = create_model("swinir_mini", 2).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate([(96, 80), (200, 136)]):  # LR 48x40 (padded) and 100x68 (tiles)
        base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(base).resize((width, height), Image.BICUBIC).save(paths[-1])
    config = QuantizeConfig(formats=["onnx", "onnx_fp16", "openvino"], latency_lr_size=(64, 64))
    result = run_quantize(model, tmp_path / "out", config, load_images(paths, 2), "pictures")
    figures = {f.name: f for f in result.formats}
    assert all(f.ok for f in figures.values()), figures
    assert figures["onnx"].parity_db >= 80 and figures["openvino"].parity_db >= 80
    assert figures["onnx_fp16"].parity_db >= FP16_FLOOR_DB
