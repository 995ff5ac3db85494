"""Stage 3 — train the compact student against the frozen teacher, with a loss of core.losses.

The same loop trains a model without a teacher (`loss = "l1_gt"`): `srcompress train`, and the
GT-only baselines of the benchmarks.

Fast KD: the teacher is frozen, so its output for a training image never changes. With
`teacher_cache` its output is computed once per training image (tiled, whole image; "teacher
labelling") and each patch's target is cropped from it with the same flips as the patch, instead of
running the teacher at every step. The targets differ from per-patch teacher runs only within the
teacher's receptive field of the patch border (the cached output saw the real neighbours, a per-patch
run sees zero padding).

Every schedule is a fraction of `iterations` (core.schedule), so a run of any length ends with
a finished schedule. A loss that stops being finite ends the stage with `Diverged`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from core.data.datasets import EvalImage, TrainImages
from core.errors import Diverged
from core.evaluate import evaluate_dataset
from core.infer.tuning import prepare_backend
from core.infer.upscale import upscale_array
from core.loop import (
    CHANNELS_LAST,
    EMA,
    CancelFn,
    LoopEvery,
    ProgressFn,
    check_cancel,
    load_checkpoint_state,
    never_cancel,
    no_progress,
    resolve_precision,
    resume_loop,
    save_checkpoint,
    save_loop,
    seconds_per_step,
    to_device,
)
from core.losses import LossParts, distill_loss_parts
from core.models.overparam import fold, overparameterize
from core.recipe import DISTILL_LOSSES, loss_needs_teacher
from core.results import DistillResult, LossPoint, Replan, ValPoint
from core.schedule import LrSchedule, StepCost, ema_decay_for, lr_factor, run_length, warmup_steps

# lr ×0.5 at these fractions of the run: the authors' KD configs scaled to any budget (method.md §5.3).
DEFAULT_MILESTONES = {"edsr": [0.25], "swinir": [0.3125, 0.5, 0.5625], "rlfn": [0.25, 0.5, 0.75]}

ValidationData = Path | Sequence[EvalImage]


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    iterations: int = Field(2000, ge=1)
    loss: str = Field("paper", description="one of core.losses.DISTILL_LOSSES")
    l2_finish: float = Field(
        0.0, ge=0, lt=1, description="the last this fraction of the run trains on L2 to the ground truth"
    )
    alpha: float = Field(0.1, ge=0, description="weight of L1(student, GT) in the paper / pixel_hf losses")
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adamax", "adam_code_compat"] = "adamax"
    schedule: LrSchedule = "step"
    warmup: float = Field(0.0, ge=0, lt=1, description="lr warm-up, fraction of the run")
    lr_milestones: list[float] | None = Field(None, description="fractions of the run; None = family default")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_horizon: float | None = Field(None, gt=0, le=1, description="EMA spans at most this fraction")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    overparam: float = Field(
        0.0,
        ge=0,
        le=8,
        description="train 3×3 convs over-parameterized, expanding to this × their "
        "inputs (core.models.overparam), folded after training; 0: off",
    )
    teacher_cache: bool = Field(True, description="crop teacher targets from a once-computed output")
    validate_every: int = Field(500, ge=0, description="0 = only at the end")
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    max_seconds: float | None = Field(None, gt=0, description="stop early after this wall-clock budget")
    replan: bool = Field(
        False,
        description="re-plan `iterations` once, at the end of the warm-up, to fill `max_seconds` less "
        "`reserve_seconds` at the step time the loop itself measured",
    )
    reserve_seconds: float = Field(0.0, ge=0, description="what validations will take of `max_seconds`")
    finish_step_ratio: float = Field(
        1.0, gt=0, description="an `l2_finish` step's measured cost over a step of `loss`, for the re-plan"
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str) -> str:
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(DISTILL_LOSSES)}")
        return loss


# A budgeted run re-plans at the end of its lr warm-up, and no earlier than this share of its first plan,
# from the steps of the second half of that stretch (the first ones pay for oneDNN's primitive set-up).
REPLAN_SHARE = 0.02


def replan_point(config: DistillConfig, warm: int) -> int | None:
    """The iteration after which a budgeted run re-plans its length (None: it does not)."""
    if not config.replan or config.max_seconds is None:
        return None
    return max(warm, math.ceil(REPLAN_SHARE * config.iterations), 2)


def milestones_at(fractions: Sequence[float], total: int) -> tuple[int, ...]:
    """The `step` schedule's milestones of a `total`-step run."""
    return tuple(sorted({max(1, round(f * total)) for f in fractions}))


def replanned(config: DistillConfig, total: int) -> DistillConfig:
    """The run at its re-planned length; its validations keep their count."""
    every = math.ceil(config.validate_every * total / config.iterations) if config.validate_every else 0
    return config.model_copy(update={"iterations": total, "validate_every": every})


def loss_at(config: DistillConfig, iteration: int) -> str:
    """The loss of step `iteration`: the run's, then over its last `l2_finish` the mean squared error to
    the ground truth. PSNR is a function of that error; L1 trains faster early on, and a short
    L2 finish at the decayed lr then spends the last steps on the metric itself."""
    finish_from = config.iterations - round(config.l2_finish * config.iterations)
    return "l2_gt" if iteration > finish_from else config.loss


def make_optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamax":
        return torch.optim.Adamax(model.parameters(), lr=config.lr, betas=(0.9, 0.99), eps=1e-8)
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999))


# Teacher labelling runs the teacher once over every training image. On a CPU ONNX Runtime does it about
# 3x faster than eager PyTorch (RLFN-S on a 512x400 LR image: 1.7 s vs 5 s on a 2-core EPYC), within
# 2e-6 of it and deterministic, so a resumed run gets the same targets.
LABELLING_BACKEND = {"cpu": "onnxruntime", "cuda": "channels_last"}


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module,
    data: TrainImages,
    device: torch.device,
    order: Sequence[int] | None = None,
    seconds: float | None = None,
) -> list[np.ndarray | None]:
    """The teacher's output (HxWx3 float32, clamped to [0, 1]) for the training images, tiled: all
    of them, or those of `order` that fit in `seconds` of labelling (None for the others)."""
    runner = prepare_backend(teacher.to(device).eval(), LABELLING_BACKEND.get(device.type, "eager"))
    outputs: list[np.ndarray | None] = [None] * len(data)
    began = time.perf_counter()
    for index in order if order is not None else range(len(data)):
        if seconds is not None and time.perf_counter() - began >= seconds:
            break
        outputs[index] = upscale_array(
            teacher, data.lr_images[index].astype(np.float32) / 255.0, backend=runner
        )
    return outputs


def with_ground_truth(data: TrainImages, outputs: list[np.ndarray | None]) -> list[np.ndarray]:
    """Training targets: the teacher's output where it labelled the image, else the ground truth."""
    return [
        out if out is not None else hr.astype(np.float32) / 255.0
        for out, hr in zip(outputs, data.hr_images, strict=True)
    ]


def train_step(
    student: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data: TrainImages,
    iteration: int,
    targets: list[np.ndarray] | None,
    config: DistillConfig,
    device: torch.device,
) -> LossParts:
    """One optimizer step on batch `iteration` (the forward passes autocast when the precision says so;
    the loss and the update in fp32). Teacher targets come from `targets` when given, else from
    running the teacher on the batch."""
    precision = resolve_precision(config.precision, device)
    loss = loss_at(config, iteration)
    if targets is not None:
        lr_batch, hr_batch, teacher_batch = data.batch(iteration, extra=targets)
        teacher_out = to_device(teacher_batch, device)
    else:
        lr_batch, hr_batch = data.batch(iteration)
        teacher_out = None
    lr_batch, hr_batch = to_device(lr_batch, device), to_device(hr_batch, device)
    with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.dtype is not None):
        out = student(lr_batch)
        if teacher_out is None and loss_needs_teacher(loss):
            with torch.no_grad():
                teacher_out = teacher(lr_batch)
    teacher_out = None if teacher_out is None else teacher_out.float()
    parts = distill_loss_parts(loss, out.float(), teacher_out, hr_batch, alpha=config.alpha)
    if torch.isfinite(parts.total):  # a non-finite loss is the caller's to report, not to apply
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts.total).backward()
        scaler.step(optimizer)
        scaler.update()
    return parts


def measure_distill_step(
    student: nn.Module,
    teacher: nn.Module | None,
    data: TrainImages,
    targets: list[np.ndarray] | None,
    config: DistillConfig,
    device: torch.device,
    min_seconds: float = 0.0,
) -> StepCost:
    """Seconds per distillation step on this machine (the step and its EMA update, as the loop runs
    them), on throwaway copies of the student, its average and the optimizer; and when the run ends on
    an L2 finish, that step's cost relative to it (from a measurement half as long)."""
    student = copy.deepcopy(student)
    if config.overparam:
        overparameterize(student, config.overparam)
    student = student.to(device, memory_format=CHANNELS_LAST).train()
    ema = EMA(student, config.ema_decay)
    optimizer = make_optimizer(student, config)
    scaler = torch.amp.GradScaler(
        device.type, enabled=resolve_precision(config.precision, device).needs_grad_scaler
    )
    if teacher is not None:
        teacher = teacher.to(device, memory_format=CHANNELS_LAST).eval().requires_grad_(False)

    def seconds_of(loss: str, min_seconds: float) -> float:
        run = config.model_copy(update={"loss": loss, "l2_finish": 0.0})

        def step(k: int) -> None:
            parts = train_step(student, teacher, optimizer, scaler, data, k, targets, run, device)
            float(parts.total.detach())
            ema.update(student, 1)

        return seconds_per_step(step, min_seconds=min_seconds)

    seconds = seconds_of(config.loss, min_seconds)
    if config.l2_finish == 0 or config.loss == "l2_gt":
        return StepCost(seconds)
    return StepCost(seconds, seconds_of("l2_gt", min_seconds / 2) / seconds)


def run_distill(
    student: nn.Module,
    teacher: nn.Module | None,
    data: TrainImages,
    val: ValidationData | None,
    config: DistillConfig,
    workdir: Path,
    device: torch.device,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    stage: str = "distilling",
    targets: list[np.ndarray] | None = None,
    val_name: str | None = None,
) -> tuple[nn.Module, DistillResult]:
    """Train `student`; returns the best EMA weights by PSNR on `val` (a folder or images in memory;
    None: the last EMA weights). `targets` are the teacher's outputs for `data` when the caller has
    already labelled it (see `teacher_outputs`). Resumes from workdir/<stage>.pt."""
    uses_teacher = loss_needs_teacher(config.loss)
    if uses_teacher and teacher is None:
        raise ValueError(f"the {config.loss!r} loss needs a teacher")
    family = student.config.family
    fractions = config.lr_milestones if config.lr_milestones is not None else DEFAULT_MILESTONES[family]
    planned = config.iterations  # a budgeted run may re-plan its length once (replan_point)
    warm = warmup_steps(config.warmup, planned)
    replan_at = replan_point(config, warm)
    precision = resolve_precision(config.precision, device)
    if config.overparam:  # in place, like the training itself; `fold` below undoes it on the result
        overparameterize(student, config.overparam)
    student = student.to(device, memory_format=CHANNELS_LAST).train()
    ema_decay = ema_decay_for(planned, config.ema_decay, config.ema_horizon)
    ema = EMA(student, ema_decay)
    optimizer = make_optimizer(student, config)
    # `config` and `milestones` are rebound on a re-plan; the lambda reads the current ones.
    milestones = milestones_at(fractions, planned)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        # LambdaLR asks for step k's factor before step k + 1 (k = 0 at construction).
        lambda k: lr_factor(k + 1, config.iterations, config.schedule, warm, milestones),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=CHANNELS_LAST).eval().requires_grad_(False)

    path = workdir / f"{stage}.pt"
    best_path = workdir / f"{stage}_best.pt"
    start, elapsed, cache_seconds = 0, 0.0, 0.0
    replan: Replan | None = None
    val_curve: list[ValPoint] = []
    loss_curve: list[LossPoint] = []
    best = ValPoint(iteration=0, psnr=float("-inf"), ssim=0.0)
    stateful = {
        "model": student,
        "ema": ema.model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
    }
    if (state := resume_loop(path, stateful)) is not None:
        start, elapsed, cache_seconds = state["iteration"], state["seconds"], state["cache_seconds"]
        val_curve = [ValPoint(**p) for p in state["val_curve"]]
        loss_curve = [LossPoint(**p) for p in state["loss_curve"]]
        best = ValPoint(**state["best"])
        if state.get("replan") is not None:  # the run was re-planned before this checkpoint
            replan = Replan(**state["replan"])
            config = replanned(config, replan.iterations)
            milestones = milestones_at(fractions, config.iterations)
    if replan is not None or (replan_at is not None and start >= replan_at):
        replan_at = None

    # The stage's wall clock (and max_seconds) includes computing the teacher cache: the fast loop
    # pays for it up front.
    began = time.perf_counter() - elapsed
    cache = targets
    if cache is None and uses_teacher and config.teacher_cache and start < config.iterations:
        cache = with_ground_truth(data, teacher_outputs(teacher, data, device))
        if start == 0:
            cache_seconds = time.perf_counter() - began

    def validate(iteration: int) -> ValPoint:
        result = evaluate_dataset(ema.model, val, data.scale, device=device, name=val_name)
        return ValPoint(
            iteration=iteration, psnr=result.psnr, ssim=result.ssim, seconds=time.perf_counter() - began
        )

    every = LoopEvery(
        log=config.log_every, validate=config.validate_every, checkpoint=config.checkpoint_every
    )
    loop_began = time.perf_counter()
    iteration, stopped_early = start, False
    validation_seconds = 0.0
    # The re-plan times the steps after `replan_from`, validations excluded (see REPLAN_SHARE).
    replan_from = max(replan_at // 2, start) if replan_at is not None else None
    window = (loop_began, 0.0)
    last_finite = float("nan")
    while iteration < config.iterations:
        check_cancel(should_cancel)
        iteration += 1
        parts = train_step(student, teacher, optimizer, scaler, data, iteration, cache, config, device)
        loss_value = float(parts.total.detach())
        if not np.isfinite(loss_value):
            raise Diverged(
                f"the training loss became {loss_value} at iteration {iteration} "
                f"(last finite loss {last_finite:.6g}); lower the lr ({config.lr:g}) or the loss weights"
            )
        last_finite = loss_value
        if iteration == replan_from:
            window = (time.perf_counter(), validation_seconds)
        if iteration == replan_at:
            now = time.perf_counter()
            step_seconds = (now - window[0] - (validation_seconds - window[1])) / (replan_at - replan_from)
            left = config.max_seconds - (now - began) - config.reserve_seconds
            replan = Replan(
                at_iteration=iteration,
                step_seconds=step_seconds,
                iterations=run_length(
                    left, step_seconds, iteration, config.l2_finish, config.finish_step_ratio
                ),
            )
            config = replanned(config, replan.iterations)
            milestones = milestones_at(fractions, config.iterations)
            every.validate = config.validate_every
        scheduler.step()  # the next step's lr, from the re-planned length if it just changed
        ema.update(student, iteration)

        over_time = config.max_seconds is not None and time.perf_counter() - began >= config.max_seconds
        last = config.iterations if not over_time else iteration
        stopped_early = over_time and iteration < config.iterations
        metrics: dict = {}
        if every.due(every.log, iteration, last):
            point = LossPoint(iteration=iteration, **parts.as_floats())
            loss_curve.append(point)
            metrics.update(point.model_dump())
            run_seconds = time.perf_counter() - loop_began
            metrics["elapsed_s"] = round(time.perf_counter() - began, 1)
            metrics["eta_s"] = round(run_seconds / (iteration - start) * (last - iteration), 1)
        if val is not None and every.due(every.validate, iteration, last):
            validation_began = time.perf_counter()
            point = validate(iteration)
            validation_seconds += time.perf_counter() - validation_began
            val_curve.append(point)
            metrics["val_psnr"] = point.psnr
            if point.psnr > best.psnr:
                best = point
                save_checkpoint(best_path, {"ema": ema.model.state_dict(), "iteration": iteration})
        if metrics:
            on_progress(stage, iteration / last, metrics)  # 1.0 at a deadline too
        if every.due(every.checkpoint, iteration, last) or iteration == replan_at:
            save_loop(
                path, iteration, began, stateful,
                cache_seconds=cache_seconds,
                replan=replan.model_dump() if replan is not None else None,
                val_curve=[p.model_dump() for p in val_curve],
                loss_curve=[p.model_dump() for p in loss_curve],
                best=best.model_dump(),
            )  # fmt: skip
        if over_time:
            break

    seconds = time.perf_counter() - began
    final = ema.model
    if best_path.exists():  # the best EMA weights by validation PSNR; the last ones stay in `path`
        final.load_state_dict(load_checkpoint_state(best_path)["ema"])
    else:
        best = ValPoint(iteration=iteration, psnr=float("nan"), ssim=float("nan"))
    result = DistillResult(
        iterations=iteration,
        planned_iterations=planned,
        replan=replan,
        stopped_early=stopped_early,
        best_iteration=best.iteration,
        best_psnr=best.psnr,
        validation_set=val_name or (str(val) if isinstance(val, Path) else ""),
        val_curve=val_curve,
        loss_curve=loss_curve,
        seconds=seconds,
        teacher_cache_seconds=cache_seconds,
        iterations_per_second=(iteration - start) / max(time.perf_counter() - loop_began, 1e-9),
        lr_milestones=list(milestones) if config.schedule == "step" else [],
        loss=config.loss,
        schedule=config.schedule,
        ema_decay=ema_decay,
        precision=precision.name,
        precision_reason=precision.reason,
    )
    return fold(final).eval(), result
