"""The whole compression job: prune → compress → distill → evaluate → export → quantize, resumable from
`workdir`.

`run_pipeline` runs a `JobConfig` (the contract, core.job), returns a `CompressionReport` and leaves
every artifact in `workdir/out/`. Each finished stage writes its typed result into `workdir/state.json`, and
every training stage checkpoints itself, so a killed run continues where it stopped.
"""

from __future__ import annotations

import copy
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.compress.stage import CompressConfig, run_compress
from core.data.datasets import (
    TrainImages,
    find_pairs,
    holdout_split,
    list_images,
    load_eval_set,
    load_images,
)
from core.distill.inherit import inherit_weights
from core.distill.stage import (
    DistillConfig,
    measure_distill_step,
    run_distill,
    teacher_outputs,
    with_ground_truth,
)
from core.errors import UserError
from core.evaluate import evaluate_dataset, evaluate_model
from core.export import export_model
from core.job import (
    CompressionReport,
    DatasetScore,
    GapRow,
    Holdout,
    JobConfig,
    JobParams,
    ModelSummary,
)
from core.loop import (
    CancelFn,
    ProgressFn,
    load_checkpoint_state,
    never_cancel,
    no_progress,
    resolve_device,
    seed_everything,
)
from core.models.build import build_model
from core.models.checkpoint import load_checkpoint, load_model, save_model
from core.models.config import parse_config
from core.models.presets import preset_config
from core.prune.stage import PruneConfig, measure_prune_step, run_prune
from core.quantize.stage import QuantizeConfig, run_quantize
from core.recipe import (
    loss_needs_teacher,
)
from core.report import crop_comparison_png, learning_curve_png, psnr_params_png, write_card
from core.results import CompressResult, DistillResult, ExportResult, PruneResult, QuantizeResult
from core.schedule import plan_pruning, validate_every_for
from core.state import RunState

MEASURE_SECONDS, MEASURE_SHARE = 8.0, 0.02  # a budgeted run times its step this long (at most 2%)
log = logging.getLogger("srcompress.pipeline")


# --- helpers ------------------------------------------------------------------------------------------


def validate_inputs(config: JobConfig) -> tuple[nn.Module, dict]:
    """Everything that can be checked before any work starts: teacher fits the preset, data exists."""
    preset_config(config.model, config.scale)  # unknown preset → UserError
    teacher, info = load_checkpoint(config.teacher_weights, preset=config.model, scale=config.scale)
    for folder in [*config.train_data, *config.val_data]:
        if not Path(folder).is_dir():
            raise UserError(f"dataset folder not found: {folder}")
    for folder in config.val_data:
        find_pairs(folder, config.scale)  # an empty or unreadable set → UserError
    return teacher, info if isinstance(info, dict) else getattr(info, "model_dump", lambda: {})()


@torch.inference_mode()
def measure_latency(model: nn.Module, device: torch.device, lr_size: tuple[int, int], runs: int = 3) -> float:
    """Median forward time (ms) of one LR image, fp32 eager, after one warm-up run."""
    model = model.eval().to(device)
    x = torch.rand(1, 3, lr_size[1], lr_size[0], device=device)
    times = []
    for i in range(runs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def versions() -> dict[str, str]:
    import numpy
    import onnxruntime

    from core import __version__

    return {
        "srcompress": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def _attach_log(workdir: Path) -> logging.Handler:
    handler = logging.FileHandler(workdir / "pipeline.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


# --- the pipeline -------------------------------------------------------------------------------------


def run_pipeline(
    config: JobConfig,
    workdir: Path,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
) -> CompressionReport:
    """Run (or resume) a job in `workdir`; artifacts land in `workdir/out/`."""
    workdir = Path(workdir)
    device = resolve_device(config.device)
    teacher, _ = validate_inputs(config)  # before anything is written
    recipe = config.resolved_recipe()
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher.to(device).eval()
    handler = _attach_log(out)
    state = RunState(workdir / "state.json")
    log.info("job %s on %s", config.model_dump_json(by_alias=True), device)
    log.info("recipe %s", recipe.model_dump_json())
    budget_seconds = config.budget_minutes * 60 if config.budget_minutes is not None else None
    try:
        seed_everything(config.seed)
        # The checkpoint is chosen on images held out from the training set, never on the sets the
        # job reports (config.val_data), so that the reported figures are not selected on.
        paths = [p for folder in config.train_data for p in list_images(folder)]
        train_paths, holdout_paths = holdout_split(paths, recipe.holdout_images, config.seed)
        train = TrainImages(
            train_paths,
            config.scale,
            lr_patch=recipe.patch_size,
            batch_size=recipe.batch_size,
            seed=config.seed,
            rescales=recipe.rescales,
        )
        holdout = load_images(holdout_paths, config.scale)
        log.info(
            "training images: %d (%d too small: %s); held out for selection: %s",
            len(train), len(train.skipped), train.skipped, [p.name for p in holdout_paths],
        )  # fmt: skip

        # 1 prune
        prune_config = PruneConfig(
            iterations=recipe.prune_iters,
            lr=config.prune_lr,
            lambda_=config.lambda_ if config.lambda_ is not None else 1e-4,
            checkpoint_every=config.checkpoint_every,
        )
        if budget_seconds is not None and state.plan is None:
            step = measure_prune_step(teacher, train, prune_config, device)
            state.plan = plan_pruning(budget_seconds, recipe.prune_share, step)
            log.info("budget plan (pruning): %s", state.plan.model_dump_json())
        if state.plan is not None:
            prune_config = prune_config.model_copy(update={"iterations": state.plan.prune_iters})
        if not state.done("pruning"):
            began = time.perf_counter()
            _, prune = run_prune(teacher, train, prune_config, workdir, device, on_progress, should_cancel)
            state.put("pruning", prune, time.perf_counter() - began)
            log.info("pruned: d = %.6f after %d steps", prune.density, prune.iterations)
        prune = PruneResult(**state.get("pruning"))
        on_progress("pruning", 1.0, {"density": prune.density})

        # 2 compress
        if not state.done("compressing"):
            began = time.perf_counter()
            compress = run_compress(
                teacher.config,
                prune.density,
                CompressConfig(
                    nb_rounding=config.nb_rounding,
                    channel_multiple=config.channel_multiple,
                    target_params=config.target_params,
                    target_gmacs=config.target_gmacs,
                    student=config.student,
                    student_preset=config.student_preset,
                ),
            )
            state.put("compressing", compress, time.perf_counter() - began)
            log.info(compress.note)
        compress = CompressResult(**state.get("compressing"))
        on_progress("compressing", 1.0, {"student": list(compress.chosen), "params": compress.student.params})

        # 3 distill (teacher labelling, then the budget's iteration count, then training)
        student_dir = workdir / "student"
        if not state.done("distilling"):
            began = time.perf_counter()
            torch.manual_seed(config.seed)  # the student's init depends on the seed only
            student = build_model(parse_config(compress.student_config))
            if recipe.student_init == "inherit":
                pruned = copy.deepcopy(teacher)
                pruned.load_state_dict(load_checkpoint_state(workdir / "prune.pt")["model"])
                inherited = inherit_weights(student, pruned)
                log.info("student inherits the pruned teacher's weights: %s", inherited)
            distill_config = DistillConfig(
                iterations=recipe.distill_iters,
                loss=recipe.loss,
                l2_finish=recipe.l2_finish,
                alpha=recipe.alpha,
                lr=recipe.lr,
                schedule=recipe.schedule,
                warmup=recipe.warmup,
                lr_milestones=recipe.lr_milestones,
                ema_decay=recipe.ema_decay,
                ema_horizon=recipe.ema_horizon,
                precision=recipe.precision,
                overparam=recipe.overparam,
                teacher_cache=config.teacher_cache,
                checkpoint_every=config.checkpoint_every,
            )
            targets, labelled = None, None
            plan = state.plan
            if config.teacher_cache and loss_needs_teacher(recipe.loss):
                # Under a budget the teacher labels images (in a seeded order) for at most its share
                # of the budget; a resumed run labels the same ones, as recorded in the plan.
                on_progress("distilling", 0.0, {"phase": "teacher labelling"})
                order = np.random.default_rng([config.seed, 11]).permutation(len(train)).tolist()
                if plan is not None and plan.labelled_images is not None:
                    outputs = teacher_outputs(teacher, train, device, order[: plan.labelled_images])
                else:
                    share = recipe.labelling_share if plan is not None else None
                    seconds = share * plan.budget_seconds if share is not None else None
                    outputs = teacher_outputs(teacher, train, device, order, seconds)
                labelled = sum(out is not None for out in outputs)
                log.info("teacher labelled %d of %d training images", labelled, len(train))
                targets = with_ground_truth(train, outputs)
            validations = recipe.validations if holdout else 0
            if plan is not None and plan.distill_iters == 0:
                # Seconds of steps, not a handful: a dozen steps read 3-14% fast against the run.
                step_cost = measure_distill_step(
                    student, teacher, train, targets, distill_config, device,
                    min_seconds=min(MEASURE_SECONDS, MEASURE_SHARE * plan.budget_seconds),
                )  # fmt: skip
                state.plan = plan = plan.plan_distill(
                    spent_seconds=sum(state.data["seconds"].values()) + time.perf_counter() - began,
                    step_cost=step_cost,
                    finish_share=distill_config.l2_finish,
                    validation_seconds=(
                        _seconds(lambda: evaluate_dataset(student, holdout, config.scale, device))
                        if holdout
                        else 0.0
                    ),
                    validations=validations,
                    labelled_images=labelled,
                )
                log.info("budget plan (distillation): %s", plan.model_dump_json())
            iterations = plan.distill_iters if plan is not None else recipe.distill_iters
            validate_every = config.validate_every
            if validate_every is None:
                validate_every = validate_every_for(iterations, validations)
            # A budget is re-planned once from the loop's own steps, and is a deadline: should the
            # machine slow down after that (a shared VM drifts by tens of percent), distillation stops
            # at the budget's end with the schedule's tail cut, says so (`stopped_early`).
            distill_config = distill_config.model_copy(
                update={
                    "iterations": iterations,
                    "validate_every": validate_every,
                    "max_seconds": plan.distill_seconds if plan else None,
                    "replan": plan is not None,
                    "reserve_seconds": plan.validations * plan.validation_seconds if plan else 0.0,
                    "finish_step_ratio": plan.finish_step_ratio if plan else 1.0,
                }
            )
            student, distill = run_distill(
                student, teacher, train, holdout or None, distill_config, workdir, device,
                on_progress, should_cancel, targets=targets, val_name="holdout",
            )  # fmt: skip
            if distill.replan is not None:  # a budgeted run: its length from the loop's own steps
                log.info("distillation re-planned: %s", distill.replan.model_dump_json())
            if distill.stopped_early:
                log.warning(
                    "the budget ended after %d of %d planned iterations (steps ran slower than measured)",
                    distill.iterations, distill.replan.iterations if distill.replan else iterations,
                )  # fmt: skip
            save_model(student, student_dir)
            state.put("distilling", distill, time.perf_counter() - began)
        distill = DistillResult(**state.get("distilling"))
        student = load_model(student_dir).to(device).eval()

        # 4 evaluate: the held-out images, then every validation set the job names (reported only)
        if not state.done("evaluating"):
            began = time.perf_counter()
            scores: dict[str, list[dict]] = {"teacher": [], "student": [], "bicubic": [], "holdout": []}
            sets: list[tuple[str, Path | list]] = [("holdout", holdout)] if holdout else []
            sets += [(Path(folder).name, Path(folder)) for folder in config.val_data]
            for i, (name, data) in enumerate(sets):
                row = {}
                for label, model in (("teacher", teacher), ("student", student)):
                    result = evaluate_dataset(model, data, config.scale, device=device, name=name)
                    row[label] = DatasetScore(dataset=name, psnr=result.psnr, ssim=result.ssim).model_dump()
                bicubic = evaluate_model("bicubic", config.scale, None, data)
                row["bicubic"] = DatasetScore(dataset=name, psnr=bicubic.psnr, ssim=bicubic.ssim).model_dump()
                if name == "holdout" and i == 0:
                    scores["holdout"].append(row)
                else:
                    for label, score in row.items():
                        scores[label].append(score)
                on_progress("evaluating", (i + 1) / len(sets), {"dataset": name})
            lr_size = (320, 180)
            scores["latency_ms"] = {
                "teacher": measure_latency(teacher, device, lr_size),
                "student": measure_latency(student, device, lr_size),
                "setup": f"fp32 eager, batch 1, LR {lr_size[0]}x{lr_size[1]}, {device}, "
                f"{torch.get_num_threads()} threads",
            }
            state.put("evaluating", scores, time.perf_counter() - began)
        scores = state.get("evaluating")

        # 5 export
        if not state.done("exporting"):
            began = time.perf_counter()
            on_progress("exporting", 0.0, {})
            export = export_model(student.cpu(), out)
            state.put("exporting", export, time.perf_counter() - began)
        export = ExportResult(**state.get("exporting"))
        on_progress("exporting", 1.0, {"onnx_max_abs_diff": export.onnx_max_abs_diff})

        # 6 quantize: every format the job asks for, verified on its first validation set
        if not state.done("quantizing"):
            began = time.perf_counter()
            on_progress("quantizing", 0.0, {})
            quantize = run_quantize(
                student.cpu(),
                out,
                QuantizeConfig(
                    formats=config.formats,
                    calibration=config.calibration,
                    calibration_patches=config.calibration_patches,
                    seed=config.seed,
                ),
                verify_images=list(load_eval_set(config.val_data[0], config.scale)),
                verify_name=Path(config.val_data[0]).name,
                calibration=train,
                calibration_source=[Path(folder).name for folder in config.train_data],
                on_format=lambda i, n, name: on_progress("quantizing", i / n, {"format": name}),
            )
            state.put("quantizing", quantize, time.perf_counter() - began)
        quantize = QuantizeResult(**state.get("quantizing"))

        gaps = [
            _gap_row(row["bicubic"], row["teacher"], row["student"], selection=True)
            for row in scores["holdout"]
        ] + [
            _gap_row(b, t, st, selection=False)
            for b, t, st in zip(scores["bicubic"], scores["teacher"], scores["student"], strict=True)
        ]
        report = CompressionReport(
            params=JobParams(**config.model_dump(include=set(JobParams.model_fields))),
            recipe=recipe,
            budget=state.plan,
            holdout=Holdout(
                seed=config.seed, images=[p.name for p in holdout_paths], training_images=len(train)
            ),
            gaps=gaps,
            teacher_source=str(config.teacher_weights),
            teacher=ModelSummary(
                config=teacher.config.model_dump(),
                **compress.teacher.model_dump(),
                scores=scores["teacher"],
                latency_ms=scores["latency_ms"]["teacher"],
            ),
            student=ModelSummary(
                config=compress.student_config,
                **compress.student.model_dump(),
                scores=scores["student"],
                latency_ms=scores["latency_ms"]["student"],
            ),
            bicubic=scores["bicubic"],
            prune=prune,
            compress=compress,
            distill=distill,
            export=export,
            quantize=quantize,
            pruning_ineffective=compress.pruning_ineffective,
            latency_setup=scores["latency_ms"]["setup"],
            stage_seconds=state.data["seconds"],
            versions=versions(),
            artifacts=[],
        )
        psnr_params_png(report, out / "psnr_vs_params.png")
        learning_curve_png(report, out / "learning_curve.png")
        crop_comparison_png(teacher.cpu(), student.cpu(), config.val_data[0], config.scale, out / "crops.png")
        write_card(report, out / "MODEL_CARD.md")
        report.artifacts = sorted(p.name for p in out.iterdir()) + ["report.json"]
        (out / "report.json").write_text(report.model_dump_json(indent=2, by_alias=True))
        on_progress("quantizing", 1.0, {"student_psnr": report.student.scores[0].psnr})
        log.info("done: %s", report.artifacts)
        return report
    finally:
        log.removeHandler(handler)
        handler.close()


def _seconds(work: Callable[[], object]) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def _gap_row(bicubic: dict, teacher: dict, student: dict, selection: bool) -> GapRow:
    return GapRow(
        dataset=student["dataset"],
        bicubic=bicubic["psnr"],
        teacher=teacher["psnr"],
        student=student["psnr"],
        student_minus_teacher=student["psnr"] - teacher["psnr"],
        student_minus_bicubic=student["psnr"] - bicubic["psnr"],
        used_for_selection=selection,
    )
