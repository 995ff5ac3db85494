"""`srcompress quantize`: any stored model or checkpoint to every deployable format, each verified."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError, validated
from core.models.config import SCALES
from core.results import QuantizeResult


def cmd_quantize(args: argparse.Namespace) -> None:
    from core.data.datasets import TrainImages, load_eval_set
    from core.formats import FORMATS
    from core.models.checkpoint import load_checkpoint, save_model
    from core.quantize.stage import QuantizeConfig, run_quantize

    model, _info = load_checkpoint(args.model, preset=args.preset, scale=args.scale)
    supported = type(model.config).export_formats
    formats = args.formats or [name for name in FORMATS if name in supported]
    config = validated(
        QuantizeConfig,
        formats=formats,
        calibration=args.calibration or "percentile",
        calibration_patches=args.patches,
        seed=args.seed,
        latency_lr_size=args.latency_size,
    )
    int8 = any(FORMATS[name].precision == "int8" for name in config.formats)
    if int8 and not args.calib:
        raise UserError("int8 formats need --calib: training image folders to draw LR patches from")
    if args.out.exists() and any(args.out.iterdir()):
        raise UserError(f"{args.out} is not empty; choose a new folder")
    calibration = (
        TrainImages.from_folders(args.calib, model.config.scale, lr_patch=args.patch_size) if int8 else None
    )
    save_model(model, args.out)
    result = run_quantize(
        model,
        args.out,
        config,
        verify_images=list(load_eval_set(args.val, model.config.scale)),
        verify_name=args.val.name,
        calibration=calibration,
        calibration_source=[str(folder) for folder in args.calib or []],
    )
    (args.out / "quantize.json").write_text(result.model_dump_json(indent=2))
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print_formats(result)
        print(f"files and quantize.json in {args.out}")
    failed = [f.name for f in result.formats if not f.ok]
    if failed:
        print(f"srcompress: error: not offered: {', '.join(failed)} (reasons above)", file=sys.stderr)
        raise SystemExit(1)


def print_formats(result: QuantizeResult) -> None:
    """One line per format: its figures against fp32 on the verification set, or why it failed."""
    print(f"formats, verified on {result.verification_set} (fp32 PSNR-Y {result.fp32_psnr:.3f} dB):")
    for f in result.formats:
        if not f.ok:
            print(f"  {f.name:<14} not offered: {f.reason}")
            continue
        figures = f"parity {f.parity_db:6.2f} dB" if f.parity_db is not None else ""
        if f.quality_cost_db is not None:
            figures += f"  cost {f.quality_cost_db:+.3f} dB  {f.latency_ms:8.1f} ms"
        print(f"  {f.name:<14} {f.precision:<5} {f.runtime:<12} {f.bytes / 1e6:6.2f} MB  {figures}")


def add_quantize_parser(
    add: Callable[..., argparse.ArgumentParser],
    existing_path: Callable,
    formats_list: Callable,
    lr_size: Callable,
) -> None:
    """Register `quantize` with the top-level parser's `add` (core.cli)."""
    p = add("quantize", cmd_quantize, "export a model to int8/fp16 ONNX, OpenVINO and NCNN, each verified")
    p.add_argument("model", type=existing_path, help="a checkpoint or a srcompress model folder")
    p.add_argument("--preset", help="the preset whose hyper-parameters an official checkpoint has")
    p.add_argument("--scale", type=int, choices=SCALES)
    p.add_argument("--val", type=existing_path, required=True, help="the set every format is verified on")
    p.add_argument("--calib", type=existing_path, nargs="+", help="training image folders (int8 calibration)")
    p.add_argument(
        "--formats", type=formats_list, help="comma-separated (default: every format of the family)"
    )
    p.add_argument("--calibration", choices=["minmax", "entropy", "percentile"], help="default percentile")
    p.add_argument("--patches", type=int, default=128, help="calibration LR patches (default 128)")
    p.add_argument("--patch-size", type=int, default=48, help="calibration LR patch size (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-size", type=lr_size, default=(640, 360), help="LR WxH the latency is timed at")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", action="store_true")
