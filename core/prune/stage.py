"""Stage 1 — fine-tune a copy of the teacher with Charbonnier + λ‖θ‖₁ (OBProx-SG); measure density d.

Only d flows to stage 2 (method.md §1); the sparse weights are kept in the workdir for the record and
for the optional `inherit` student init.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from core.data.datasets import TrainImages
from core.loop import (
    CHANNELS_LAST,
    CancelFn,
    LoopEvery,
    ProgressFn,
    check_cancel,
    never_cancel,
    no_progress,
    resume_loop,
    save_loop,
    seconds_per_step,
    to_device,
)
from core.losses import charbonnier_loss
from core.models.build import deep_feature_weights
from core.prune.obproxsg import OBProxSG, default_prox_epochs
from core.results import DensityPoint, PruneResult


class PruneConfig(BaseModel):
    """OBProx-SG fine-tuning (method.md §3.2 defaults)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    iterations: int = Field(1000, ge=1, description="optimizer steps")
    lr: float = Field(5e-3, gt=0)
    lambda_: float = Field(1e-4, gt=0, alias="lambda", description="ℓ1 strength λ")
    eps: float = Field(1e-4, ge=0, description="orthant projection threshold")
    charbonnier_eps: float = Field(1e-3, gt=0)
    schedule: Literal["correct", "code-compat"] = "correct"
    regularize: Literal["all", "deep_features_only"] = "all"
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)


def density_report(model: nn.Module) -> tuple[float, int, int, dict[str, float]]:
    """(d, counted, non-zero, per-tensor densities) over the raw deep-feature weights."""
    weights = deep_feature_weights(model)
    per_layer = {name: float((w != 0).sum()) / w.numel() for name, w in weights.items()}
    counted = sum(w.numel() for w in weights.values())
    nonzero = int(sum(int((w != 0).sum()) for w in weights.values()))
    return nonzero / counted, counted, nonzero, per_layer


def make_optimizer(
    model: nn.Module, data: TrainImages, config: PruneConfig
) -> tuple[OBProxSG, list[nn.Parameter]]:
    """OBProx-SG over the regularised tensors (all, or the deep-feature weights only)."""
    if config.regularize == "deep_features_only":
        ids = {id(w) for w in deep_feature_weights(model).values()}
        params = [p for p in model.parameters() if id(p) in ids]
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(model.parameters())
    epoch_size = data.batches_per_epoch
    total_epochs = max(1, math.ceil(config.iterations / epoch_size))
    optimizer = OBProxSG(
        params,
        lr=config.lr,
        lambda_=config.lambda_,
        epoch_size=epoch_size,
        n_prox_epochs=default_prox_epochs(total_epochs),
        eps=config.eps,
        schedule=config.schedule,
    )
    return optimizer, params


def prune_step(
    model: nn.Module,
    optimizer: OBProxSG,
    data: TrainImages,
    iteration: int,
    device: torch.device,
    charbonnier_eps: float,
) -> torch.Tensor:
    """One OBProx-SG step on batch `iteration`; returns the Charbonnier loss."""
    lr_batch, hr_batch = (to_device(t, device) for t in data.batch(iteration))
    loss = charbonnier_loss(model(lr_batch), hr_batch, eps=charbonnier_eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def measure_prune_step(
    teacher: nn.Module, data: TrainImages, config: PruneConfig, device: torch.device
) -> float:
    """Seconds per pruning step on this machine, on a throwaway copy of the teacher."""
    model = copy.deepcopy(teacher).to(device, memory_format=CHANNELS_LAST).train()
    optimizer, _ = make_optimizer(model, data, config)
    return seconds_per_step(
        lambda k: prune_step(model, optimizer, data, k, device, config.charbonnier_eps), steps=3, warmup=1
    )


def run_prune(
    teacher: nn.Module,
    data: TrainImages,
    config: PruneConfig,
    workdir: Path,
    device: torch.device,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
) -> tuple[nn.Module, PruneResult]:
    """Prune a copy of `teacher`; resumes from `workdir/prune.pt` when it exists."""
    model = copy.deepcopy(teacher).to(device, memory_format=CHANNELS_LAST).train()
    optimizer, params = make_optimizer(model, data, config)
    epoch_size = data.batches_per_epoch
    path = workdir / "prune.pt"
    curve: list[DensityPoint] = []
    start, elapsed = 0, 0.0
    stateful = {"model": model, "optimizer": optimizer}
    if (state := resume_loop(path, stateful)) is not None:
        curve = [DensityPoint(**p) for p in state["curve"]]
        start, elapsed = state["iteration"], state["seconds"]

    every = LoopEvery(log=config.log_every, checkpoint=config.checkpoint_every)
    began = time.perf_counter() - elapsed
    loop_began = time.perf_counter()
    for iteration in range(start + 1, config.iterations + 1):
        check_cancel(should_cancel)
        loss = prune_step(model, optimizer, data, iteration, device, config.charbonnier_eps)
        if every.due(every.log, iteration, config.iterations):
            d = density_report(model)[0]
            point = DensityPoint(
                iteration=iteration,
                charbonnier=float(loss.detach()),
                l1_norm=float(sum(p.detach().abs().sum() for p in params)),
                density=d,
                phase=optimizer.phase,
            )
            curve.append(point)
            per_step = (time.perf_counter() - loop_began) / (iteration - start)
            timing = {
                "elapsed_s": round(time.perf_counter() - began, 1),
                "eta_s": round(per_step * (config.iterations - iteration), 1),
            }
            on_progress("pruning", iteration / config.iterations, point.model_dump() | timing)
        if every.due(every.checkpoint, iteration, config.iterations):
            save_loop(path, iteration, began, stateful, curve=[p.model_dump() for p in curve])

    density, counted, nonzero, per_layer = density_report(model)
    result = PruneResult(
        density=density,
        counted_weights=counted,
        nonzero_weights=nonzero,
        per_layer_density=per_layer,
        curve=curve,
        iterations=config.iterations,
        epoch_size=epoch_size,
        n_prox_epochs=optimizer.n_prox_epochs,
        final_phase=optimizer.phase,
        lambda_=config.lambda_,
        seconds=time.perf_counter() - began,
    )
    return model.eval(), result
