"""The quantize stage: build each asked-for format, verify it against fp32, keep what meets its floor.

A format that fails to convert, to run, or to meet its floor is recorded with the reason, and its files
are removed (it is not offered); the stage itself succeeds with the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import nn

from core.data.datasets import EvalImage, TrainImages
from core.errors import UserError
from core.export import EXPORT_LR_SIZE
from core.formats import DEFAULT_FORMATS, FORMATS, CalibrationMethod, FormatName
from core.infer.runners import TorchRunner
from core.models.fold import with_folded_tail
from core.models.network import model_config
from core.onnx_export import export_onnx
from core.quantize import convert
from core.quantize.calibration import calibration_patches
from core.quantize.runtimes import fit_to_model, format_runner_for
from core.quantize.verify import Outputs, latency_ms, parity_db, run_on
from core.results import Calibration, FormatResult, QuantizeResult

log = logging.getLogger("srcompress.quantize")

# What each precision must reach to be offered: (figure, bound). fp32 runtimes differ from PyTorch by
# summation order only; fp16 keeps ~11 bits; int8 is judged by what it costs against HR.
FLOORS: dict[str, tuple[str, float]] = {
    "fp32": ("parity_db", 60.0),
    "fp16": ("parity_db", 50.0),
    "int8": ("quality_cost_db", 0.30),
}
LATENCY_LR_SIZE = (640, 360)  # (width, height): a 720p output at x2, the size MACs are stated at


class QuantizeConfig(BaseModel):
    formats: list[FormatName] = Field(default_factory=lambda: list(DEFAULT_FORMATS))
    calibration: CalibrationMethod = "percentile"
    calibration_patches: int = Field(64, ge=1, le=4096)
    seed: int = 0
    latency_lr_size: tuple[int, int] = LATENCY_LR_SIZE


def check_formats(model: nn.Module, formats: Sequence[str]) -> None:
    """UserError naming any format this model's family cannot be exported to."""
    config = model_config(model)
    refused = [name for name in formats if name not in type(config).export_formats]
    if refused:
        raise UserError(f"{config.family} cannot be exported as {', '.join(refused)}: {config.formats_note}")


def run_quantize(
    model: nn.Module,
    out_dir: Path,
    config: QuantizeConfig,
    verify_images: Sequence[EvalImage],
    verify_name: str,
    calibration: TrainImages | None = None,
    calibration_source: Sequence[str] = (),
    on_format: Callable[[int, int, str], None] | None = None,
) -> QuantizeResult:
    """Write every format of `config.formats` into `out_dir` (fp32 ONNX `model.onnx` is reused when the
    export stage left it there) and verify each on `verify_images`."""
    model = model.cpu().eval()
    check_formats(model, config.formats)
    family_config = model_config(model)
    scale = family_config.scale
    int8 = [name for name in config.formats if FORMATS[name].precision == "int8"]
    if int8 and calibration is None:
        raise UserError(f"{', '.join(int8)} need calibration images (LR patches of the training data)")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / FORMATS["onnx"].file
    if not source.is_file():
        export_onnx(model, source, example_lr_size=EXPORT_LR_SIZE)
    patches = calibration_patches(calibration, config.calibration_patches, config.seed) if int8 else None
    reference = run_on(model, fit_to_model(model, TorchRunner(model, "eager")), verify_images, scale)
    builders: dict[str, Callable[[], None]] = {
        "onnx": lambda: None,
        "onnx_fp16": lambda: convert.to_onnx_fp16(source, out_dir, mixed=family_config.windowed_attention),
        "onnx_int8": lambda: convert.to_onnx_int8(source, out_dir, patches, config.calibration),
        "openvino": lambda: convert.to_openvino(source, out_dir),
        "openvino_int8": lambda: convert.to_openvino_int8(source, out_dir, patches),
        "ncnn": lambda: convert.to_ncnn(with_folded_tail(model), out_dir, fp16=False),
        "ncnn_fp16": lambda: convert.to_ncnn(with_folded_tail(model), out_dir, fp16=True),
    }
    results = []
    for i, name in enumerate(dict.fromkeys(config.formats)):
        if on_format is not None:
            on_format(i, len(config.formats), name)
        results.append(
            _build_and_verify(model, name, builders[name], out_dir, reference, verify_images, config)
        )
        log.info("format %s", results[-1].model_dump_json())
    return QuantizeResult(
        formats=results,
        calibration=Calibration(
            method=config.calibration,
            patches=config.calibration_patches,
            patch_size=calibration.lr_patch,
            seed=config.seed,
            source=list(calibration_source),
        )
        if int8 and calibration is not None
        else None,
        verification_set=verify_name,
        fp32_psnr=reference.psnr,
        fp32_ssim=reference.ssim,
        latency_lr_size=config.latency_lr_size,
        latency_setup=f"batch 1, LR {config.latency_lr_size[0]}x{config.latency_lr_size[1]}, CPU, "
        f"{torch.get_num_threads()} threads",
    )


def _build_and_verify(
    model: nn.Module,
    name: str,
    build: Callable[[], None],
    out_dir: Path,
    reference: Outputs,
    images: Sequence[EvalImage],
    config: QuantizeConfig,
) -> FormatResult:
    spec = FORMATS[name]
    began = time.perf_counter()
    result = FormatResult(
        name=name,
        precision=spec.precision,
        runtime=spec.runtime,
        file=spec.file,
        files=list(spec.files),
        ok=False,
    )
    try:
        build()
        runner = format_runner_for(model, name, out_dir)
        outputs = run_on(model, runner, images, model_config(model).scale)
        result.parity_db = parity_db(reference, outputs)
        result.psnr, result.ssim = outputs.psnr, outputs.ssim
        result.quality_cost_db = reference.psnr - outputs.psnr
        result.latency_ms = latency_ms(runner, config.latency_lr_size)
        result.bytes = sum((out_dir / file).stat().st_size for file in spec.files)
        figure, bound = FLOORS[spec.precision]
        value = getattr(result, figure)
        passed = value is not None and (value >= bound if figure == "parity_db" else value <= bound)
        result.ok = passed
        if not passed:
            result.reason = f"{figure} {value:.3f} misses the {spec.precision} floor ({bound})"
    except Exception as error:  # a format that cannot be built is recorded, the job goes on
        log.warning("format %s failed: %s", name, error, exc_info=True)
        result.reason = f"{type(error).__name__}: {str(error)[:300]}"
    if not result.ok and name != "onnx":
        for file in spec.files:
            (out_dir / file).unlink(missing_ok=True)
    result.seconds = time.perf_counter() - began
    return result
