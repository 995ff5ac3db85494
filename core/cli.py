"""The ML commands of the `srcompress` command line: models, info, eval, upscale, compress, train,
quantize.

`register(subparsers)` adds them to the top-level parser (srcompress.cli, which also adds the service's
commands). Every sub-command is a thin shell over a core function. A `UserError` (bad preset, missing file, a
checkpoint that does not fit, ...) is printed as one line on stderr with exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError, validated
from core.quantize.command import add_quantize_parser, print_formats

SCALES = (2, 3, 4)


def _lr_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x360, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


def _formats(text: str) -> list[str]:
    from core.formats import FORMATS

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown format {unknown}; choose from {', '.join(FORMATS)}")
    return names


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return path


def _model(name: str, scale: int, weights: Path | None):
    """A preset with random weights, or a checkpoint (whose family and scale must agree with the request)."""
    from core.models.build import create_model
    from core.models.checkpoint import load_checkpoint

    if weights is None:
        return create_model(name, scale)
    model, _info = load_checkpoint(weights, preset=name, scale=scale)
    return model


def _progress_bar(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not sys.stderr.isatty())


# --- sub-commands -------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> None:
    from core.complexity import config_complexity
    from core.models.presets import PRESETS, preset_config

    rows = []
    for name in PRESETS:
        for scale in SCALES:
            c = config_complexity(preset_config(name, scale))
            rows.append((name, scale, c.params, c.params_excl_rpb, c.macs / 1e9, c.lr_size))
    if args.json:
        keys = ("preset", "scale", "params", "params_excl_rpb", "gmacs", "lr_size")
        print(json.dumps([dict(zip(keys, row, strict=True)) for row in rows], indent=2))
        return
    print(f"{'preset':<20}{'scale':>6}{'params':>14}{'excl. RPB':>14}{'GMACs':>11}  LR size")
    for name, scale, total, excl, gmacs, (w, h) in rows:
        print(f"{name:<20}{'x' + str(scale):>6}{total:>14,}{excl:>14,}{gmacs:>11.2f}  {w}x{h}")


def cmd_info(args: argparse.Namespace) -> None:
    from core.complexity import count_macs, count_params, default_lr_size

    model = _model(args.model, args.scale, args.weights)
    lr_size = args.lr_size or default_lr_size(args.scale)
    params = count_params(model)
    macs = count_macs(model, lr_size)
    info = {
        "model": args.model,
        "scale": args.scale,
        "config": model.config.model_dump(),
        "params": params.total,
        "params_excl_rpb": params.excl_rpb,
        "macs": macs.macs,
        "gmacs": round(macs.macs / 1e9, 3),
        "flops": macs.flops,
        "macs_by_op": macs.by_op,
        "lr_size": list(lr_size),
        "output_size": [lr_size[0] * args.scale, lr_size[1] * args.scale],
        "counter": "torch.utils.flop_counter.FlopCounterMode (MACs = FLOPs / 2)",
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    w, h = lr_size
    print(f"{args.model} x{args.scale}: {model.config.model_dump_json()}")
    print(f"params        {params.total:,} ({params.excl_rpb:,} without relative-position tables)")
    print(f"MACs          {macs.macs / 1e9:.2f} G at LR {w}x{h} -> {w * args.scale}x{h * args.scale}")


def _warn_if_untrained(args: argparse.Namespace) -> None:
    # A preset without --weights is a randomly initialised network: allowed (smoke tests, timing), but
    # its pictures and scores are noise, which a user who forgot the flag must be told.
    if args.weights is None and args.model != "bicubic":
        print(
            f"srcompress: note: no --weights given: {args.model} has random weights, its output is noise",
            file=sys.stderr,
        )


def cmd_eval(args: argparse.Namespace) -> None:
    from core.evaluate import evaluate_model

    results = []
    for data_dir in args.data:
        bar = _progress_bar(None, data_dir.name)

        def on_progress(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = evaluate_model(args.model, args.scale, args.weights, data_dir, on_progress=on_progress)
        bar.close()
        results.append(result)
        if not args.json:
            print(f"{result.dataset} x{args.scale} ({len(result.images)} images)")
            for image in result.images:
                print(f"  {image.name:<24}{image.psnr:>9.3f} dB{image.ssim:>9.4f}")
            print(f"  {'mean':<24}{result.psnr:>9.3f} dB{result.ssim:>9.4f}")
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    _warn_if_untrained(args)


def cmd_upscale(args: argparse.Namespace) -> None:
    from core.infer.upscale import upscale_file

    model = _model(args.model, args.scale, args.weights)
    bar = _progress_bar(None, "tiles")

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    upscale_file(
        model, args.input, args.output, tile=args.tile, backend=args.backend, on_progress=on_progress
    )
    bar.close()
    print(f"wrote {args.output}")
    _warn_if_untrained(args)


def _pipeline_progress():
    """A progress bar per stage, driven by run_pipeline's (stage, fraction, metrics) events."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def on_progress(stage: str, fraction: float, metrics: dict) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(
                total=1000, desc=stage, bar_format="{desc:<12}{bar}| {percentage:3.0f}% {postfix}"
            )
        bar = bars[stage]
        bar.n = int(fraction * 1000)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items() if k != "phase"}
        bar.set_postfix(shown, refresh=True)

    return on_progress, bars


def cmd_compress(args: argparse.Namespace) -> None:
    from core.job import JobConfig
    from core.pipeline import run_pipeline

    fields = {
        "model": args.model,
        "scale": args.scale,
        "teacher_weights": args.teacher,
        "train_data": args.train,
        "val_data": args.val,
        "lambda": args.lambda_,
        "target_params": args.target_params,
        "target_gmacs": args.target_macs,
        "recipe": args.recipe,
        "budget_minutes": args.minutes,
        "student_preset": args.student_preset,
        "distill_loss": args.loss,
        "lr_schedule": args.schedule,
        "precision": args.precision,
        "holdout_images": args.holdout,
        "alpha": args.alpha,
        "prune_iters": args.prune_iters,
        "distill_iters": args.distill_iters,
        "prune_lr": args.prune_lr,
        "distill_lr": args.distill_lr,
        "batch_size": args.batch_size,
        "patch_size": args.patch_size,
        "overparam": args.overparam,
        "nb_rounding": args.rounding,
        "teacher_cache": not args.no_teacher_cache,
        "student_init": args.student_init,
        "validate_every": args.validate_every,
        "checkpoint_every": args.checkpoint_every,
        "seed": args.seed,
        "device": args.device,
        "formats": args.formats,
        "calibration": args.calibration,
    }
    config = validated(JobConfig, **{k: v for k, v in fields.items() if v is not None})
    if args.out.exists() and any(args.out.iterdir()) and not args.resume:
        raise UserError(f"{args.out} is not empty; pass --resume to continue the run in it")
    on_progress, bars = _pipeline_progress()
    report = run_pipeline(config, args.out, on_progress=on_progress)
    for bar in bars.values():
        bar.close()
    t, s = report.teacher, report.student
    print(
        f"student {tuple(report.compress.chosen)} (nc, nl, nb): "
        f"{s.params:,} params ({s.params / t.params:.1%}); recipe {report.recipe.name}, "
        f"{report.distill.iterations:,} distillation iterations"
    )
    for g in report.gaps:
        chose = "  (held out from training; chose the checkpoint)" if g.used_for_selection else ""
        print(
            f"  {g.dataset:<10} bicubic {g.bicubic:.3f}  teacher {g.teacher:.3f}  student {g.student:.3f} dB"
            f"  student − teacher {g.student_minus_teacher:+.3f}{chose}"
        )
    if report.pruning_ineffective:
        print("  note: pruning_ineffective — " + report.compress.note)
    if report.quantize is not None:
        print_formats(report.quantize)
    print(f"artifacts in {args.out / 'out'}")


def cmd_train(args: argparse.Namespace) -> None:
    from core.train import TrainConfig, run_training

    config = validated(
        TrainConfig,
        model=args.model,
        scale=args.scale,
        train_data=args.train,
        val_data=args.val,
        iterations=args.iters,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        seed=args.seed,
        device=args.device,
    )
    if args.out.exists() and any(args.out.iterdir()) and not args.resume:
        raise UserError(f"{args.out} is not empty; pass --resume to continue the run in it")
    on_progress, bars = _pipeline_progress()
    result = run_training(config, args.out, on_progress=on_progress)
    for bar in bars.values():
        bar.close()
    print(
        f"trained {args.model} x{args.scale}: "
        f"best {result.best_psnr:.3f} dB at iteration {result.best_iteration}"
    )
    print(f"model in {args.out / 'model'}")


# --- parser -------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add core's commands to the `srcompress` parser."""

    def add(name: str, func: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("models", cmd_models, "list the model presets with params and MACs per scale")
    p.add_argument("--json", action="store_true")

    p = add("info", cmd_info, "params and MACs of a preset or checkpoint")
    p.add_argument("model", help="preset name (see `srcompress models`)")
    p.add_argument("--scale", type=int, choices=SCALES, required=True)
    p.add_argument("--weights", type=_existing_path, help="checkpoint (.pth/.pt/.safetensors or a model dir)")
    p.add_argument("--lr-size", type=_lr_size, help="LR input size WxH (default 640x360 at x2)")
    p.add_argument("--json", action="store_true")

    p = add("eval", cmd_eval, "PSNR/SSIM on the Y channel per image and per dataset")
    p.add_argument("model", help="preset name, or `bicubic`")
    p.add_argument("--scale", type=int, choices=SCALES, required=True)
    p.add_argument("--weights", type=_existing_path)
    p.add_argument("--data", type=_existing_path, nargs="+", required=True, help="dataset folders")
    p.add_argument("--json", action="store_true")

    p = add("upscale", cmd_upscale, "upscale one image")
    p.add_argument("model", help="preset name")
    p.add_argument("--scale", type=int, choices=SCALES, required=True)
    p.add_argument("--weights", type=_existing_path)
    p.add_argument("input", type=_existing_path)
    p.add_argument("output", type=Path)
    p.add_argument("--tile", type=int, help="LR tile size in pixels (default: sized from free memory)")
    p.add_argument(
        "--backend",
        default="auto",
        help="auto (default: the fastest path whose PSNR is within 0.05 dB of fp32, decided once per "
        "model and cached), eager, channels_last, sdpa, bf16 or onnxruntime",
    )

    p = add("compress", cmd_compress, "prune, compress and distill a teacher into a compact model")
    p.add_argument("model", help="the teacher's preset, e.g. rlfn_s")
    p.add_argument("--scale", type=int, choices=SCALES, required=True)
    p.add_argument("--teacher", type=_existing_path, required=True, help="teacher checkpoint")
    p.add_argument("--train", type=_existing_path, nargs="+", required=True, help="training image folders")
    p.add_argument("--val", type=_existing_path, nargs="+", required=True, help="validation sets")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--lambda", dest="lambda_", type=float, help="l1 strength (default 1e-4)")
    budget.add_argument("--target-params", type=int, help="student parameter budget")
    budget.add_argument("--target-macs", type=float, help="student MAC budget in G at the default LR size")
    p.add_argument(
        "--recipe", choices=["fast", "paper"], help="fast (default: best student per minute) or paper"
    )
    p.add_argument(
        "--minutes",
        type=float,
        help="time budget for pruning, teacher labelling and distillation (instead of iteration counts)",
    )
    p.add_argument("--student-preset", help="train this preset as the student (e.g. edsr_mini)")
    p.add_argument("--alpha", type=float, help="weight of L1 to the ground truth (default 0.1)")
    p.add_argument("--prune-iters", type=int)
    p.add_argument("--distill-iters", type=int)
    p.add_argument("--prune-lr", type=float, help="OBProx-SG step size (default 5e-3)")
    p.add_argument("--distill-lr", type=float, help="student learning rate (fast 2e-3, paper 1e-4)")
    p.add_argument(
        "--loss",
        help="distillation loss: l1_gt (fast), paper, pixel_hf, laplacian_flat, l1_teacher or blend",
    )
    p.add_argument("--schedule", choices=["cosine", "linear", "step"], help="lr schedule")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="training precision")
    p.add_argument("--holdout", type=int, help="training images held out to choose the checkpoint")
    p.add_argument("--batch-size", type=int, help="patches per step (default: the recipe's)")
    p.add_argument("--patch-size", type=int, help="LR patch size (default: the recipe's)")
    p.add_argument(
        "--overparam",
        type=float,
        help="train 3×3 convs with expansion branches of this × their inputs, folded after (0: off)",
    )
    p.add_argument("--rounding", choices=["paper-compat", "nearest", "floor"])
    p.add_argument("--no-teacher-cache", action="store_true", help="run the teacher at every KD step")
    p.add_argument(
        "--student-init", choices=["scratch", "inherit"], help="scratch (paper) or from the pruned weights"
    )
    p.add_argument("--validate-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--formats", type=_formats, help="comma-separated formats to build (default onnx)")
    p.add_argument("--calibration", choices=["minmax", "entropy", "percentile"], help="int8 ranges")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")

    add_quantize_parser(add, _existing_path, _formats, _lr_size)

    p = add("train", cmd_train, "supervised training (L1) of any preset from scratch")
    p.add_argument("model")
    p.add_argument("--scale", type=int, choices=SCALES, required=True)
    p.add_argument("--train", type=_existing_path, nargs="+", required=True)
    p.add_argument("--val", type=_existing_path, nargs="+", required=True)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--patch-size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true")
