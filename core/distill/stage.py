"""Stage 3 — train the compact student: α·L1(student, GT) + Laplacian losses to the frozen teacher.

The same loop trains a model without a teacher (`loss = "l1"`): `srcompress train`, and the no-KD
baseline of bench/quality.py.

Fast KD: the teacher is frozen, so its output for a training image never changes. With
`teacher_cache` its output is computed once per training image (tiled, whole image) and each patch's
target is cropped from it with the same flips as the patch, instead of running the teacher at every
step. The targets differ from per-patch teacher runs only within the teacher's receptive field of the
patch border (the cached output saw the real neighbours, a per-patch run sees zero padding).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from core.data.datasets import TrainImages
from core.evaluate import evaluate_dataset
from core.inference import upscale_array
from core.losses import kd_loss_parts
from core.training import (
    CHANNELS_LAST,
    EMA,
    CancelFn,
    LoopEvery,
    ProgressFn,
    check_cancel,
    load_checkpoint_state,
    never_cancel,
    no_progress,
    rng_state,
    save_checkpoint,
    set_rng_state,
    to_device,
)

# lr ×0.5 at these fractions of the run: the authors' KD configs scaled to any budget (method.md §5.3).
DEFAULT_MILESTONES = {"edsr": [0.25], "swinir": [0.3125, 0.5, 0.5625], "rlfn": [0.25, 0.5, 0.75]}


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(2000, ge=1)
    loss: Literal["kd", "l1"] = Field("kd", description="kd: the paper's loss; l1: plain L1 to GT")
    alpha: float = Field(0.1, ge=0, description="weight of L1(student, GT) in the KD loss")
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adamax", "adam_code_compat"] = "adamax"
    lr_milestones: list[float] | None = Field(None, description="fractions of the run; None = family default")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    teacher_cache: bool = Field(True, description="crop teacher targets from a once-computed output")
    validate_every: int = Field(500, ge=0, description="0 = only at the end")
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    max_seconds: float | None = Field(None, gt=0, description="stop early after this wall-clock budget")


class ValPoint(BaseModel):
    iteration: int
    psnr: float
    ssim: float


class LossPoint(BaseModel):
    iteration: int
    total: float
    l1: float
    lap: float = 0.0
    lap_hf: float = 0.0


class DistillResult(BaseModel):
    iterations: int
    stopped_early: bool
    best_iteration: int
    best_psnr: float
    validation_set: str
    val_curve: list[ValPoint]
    loss_curve: list[LossPoint]
    seconds: float
    teacher_cache_seconds: float
    iterations_per_second: float
    lr_milestones: list[int]


def make_optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamax":
        return torch.optim.Adamax(model.parameters(), lr=config.lr, betas=(0.9, 0.99), eps=1e-8)
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999))


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, data: TrainImages, device: torch.device) -> list[np.ndarray]:
    """The teacher's float output (HxWx3, [0,1], unclamped) for every training image, tiled."""
    return [upscale_array(teacher, lr.astype(np.float32) / 255.0) for lr in data.lr_images]


def run_distill(
    student: nn.Module,
    teacher: nn.Module | None,
    data: TrainImages,
    val_dir: Path | None,
    config: DistillConfig,
    workdir: Path,
    device: torch.device,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    stage: str = "distilling",
) -> tuple[nn.Module, DistillResult]:
    """Train `student`; returns the best EMA weights (by validation PSNR). Resumes from workdir/distill.pt."""
    if config.loss == "kd" and teacher is None:
        raise ValueError("the kd loss needs a teacher")
    family = student.config.family
    fractions = config.lr_milestones if config.lr_milestones is not None else DEFAULT_MILESTONES[family]
    milestones = sorted({max(1, round(f * config.iterations)) for f in fractions})
    student = student.to(device, memory_format=CHANNELS_LAST).train()
    ema = EMA(student, config.ema_decay)
    optimizer = make_optimizer(student, config)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.5)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=CHANNELS_LAST).eval().requires_grad_(False)

    path = workdir / f"{stage}.pt"
    best_path = workdir / f"{stage}_best.pt"
    start, elapsed, cache_seconds = 0, 0.0, 0.0
    val_curve: list[ValPoint] = []
    loss_curve: list[LossPoint] = []
    best = ValPoint(iteration=0, psnr=float("-inf"), ssim=0.0)
    if (state := load_checkpoint_state(path)) is not None:
        student.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, elapsed, cache_seconds = state["iteration"], state["seconds"], state["cache_seconds"]
        val_curve = [ValPoint(**p) for p in state["val_curve"]]
        loss_curve = [LossPoint(**p) for p in state["loss_curve"]]
        best = ValPoint(**state["best"])

    # The stage's wall clock (and max_seconds) includes computing the teacher cache: the fast loop
    # pays for it up front.
    began = time.perf_counter() - elapsed
    cache = None
    if teacher is not None and config.loss == "kd" and config.teacher_cache and start < config.iterations:
        cache = teacher_outputs(teacher, data, device)
        if start == 0:
            cache_seconds = time.perf_counter() - began

    def validate(iteration: int) -> ValPoint:
        result = evaluate_dataset(ema.model, val_dir, data.scale, device=device)
        return ValPoint(iteration=iteration, psnr=result.psnr, ssim=result.ssim)

    every = LoopEvery(
        log=config.log_every, validate=config.validate_every, checkpoint=config.checkpoint_every
    )
    loop_began = time.perf_counter()
    iteration, stopped_early = start, False
    while iteration < config.iterations:
        check_cancel(should_cancel)
        iteration += 1
        if cache is not None:
            lr_batch, hr_batch, teacher_batch = data.batch(iteration, extra=cache)
            teacher_out = to_device(teacher_batch, device)
        else:
            lr_batch, hr_batch = data.batch(iteration)
            teacher_out = None
        lr_batch, hr_batch = to_device(lr_batch, device), to_device(hr_batch, device)
        out = student(lr_batch)
        if config.loss == "kd":
            if teacher_out is None:
                with torch.no_grad():
                    teacher_out = teacher(lr_batch)
            parts = kd_loss_parts(out, teacher_out, hr_batch, alpha=config.alpha)
            loss = parts.total
        else:
            parts, loss = None, torch.nn.functional.l1_loss(out, hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update(student, iteration)

        over_time = config.max_seconds is not None and time.perf_counter() - began >= config.max_seconds
        last = config.iterations if not over_time else iteration
        stopped_early = over_time and iteration < config.iterations
        metrics: dict = {}
        if every.due(every.log, iteration, last):
            point = (
                LossPoint(iteration=iteration, **parts.as_floats())
                if parts is not None
                else LossPoint(iteration=iteration, total=float(loss.detach()), l1=float(loss.detach()))
            )
            loss_curve.append(point)
            metrics.update(point.model_dump())
        if val_dir is not None and every.due(every.validate, iteration, last):
            val = validate(iteration)
            val_curve.append(val)
            metrics["val_psnr"] = val.psnr
            if val.psnr > best.psnr:
                best = val
                save_checkpoint(best_path, {"ema": ema.model.state_dict(), "iteration": iteration})
        if metrics:
            on_progress(stage, iteration / config.iterations, metrics)
        if every.due(every.checkpoint, iteration, last):
            save_checkpoint(
                path,
                {
                    "iteration": iteration,
                    "model": student.state_dict(),
                    "ema": ema.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "seconds": time.perf_counter() - began,
                    "cache_seconds": cache_seconds,
                    "val_curve": [p.model_dump() for p in val_curve],
                    "loss_curve": [p.model_dump() for p in loss_curve],
                    "best": best.model_dump(),
                },
            )
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
        stopped_early=stopped_early,
        best_iteration=best.iteration,
        best_psnr=best.psnr,
        validation_set=str(val_dir) if val_dir else "",
        val_curve=val_curve,
        loss_curve=loss_curve,
        seconds=seconds,
        teacher_cache_seconds=cache_seconds,
        iterations_per_second=(iteration - start) / max(time.perf_counter() - loop_began, 1e-9),
        lr_milestones=milestones,
    )
    return final.eval(), result
