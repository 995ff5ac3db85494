"""Plain supervised training (L1 to the ground truth) of any preset: a teacher for a new domain, or
the no-KD baseline. The same loop as distillation, without a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from core.data.datasets import TrainImages, find_pairs
from core.distill.stage import DistillConfig, run_distill
from core.loop import CancelFn, ProgressFn, never_cancel, no_progress, resolve_device, seed_everything
from core.models.build import create_model
from core.models.checkpoint import save_model
from core.results import DistillResult


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    scale: Literal[2, 3, 4]
    train_data: list[Path] = Field(min_length=1)
    val_data: list[Path] = Field(min_length=1)
    iterations: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)
    patch_size: int = Field(48, ge=8)
    lr: float = Field(2e-4, gt=0)
    validate_every: int = Field(500, ge=0)
    checkpoint_every: int = Field(200, ge=1)
    max_seconds: float | None = None
    seed: int = 0
    device: str = "auto"


def run_training(
    config: TrainConfig,
    workdir: Path,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
) -> DistillResult:
    """Train from scratch (seeded init); the best EMA weights are saved to workdir/model/."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    for folder in config.val_data:
        find_pairs(folder, config.scale)
    seed_everything(config.seed)
    model = create_model(config.model, config.scale)
    data = TrainImages.from_folders(
        config.train_data,
        config.scale,
        lr_patch=config.patch_size,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    loop = DistillConfig(
        iterations=config.iterations,
        loss="l1_gt",
        lr=config.lr,
        optimizer="adam_code_compat",
        validate_every=config.validate_every,
        checkpoint_every=config.checkpoint_every,
        max_seconds=config.max_seconds,
    )
    model, result = run_distill(
        model,
        None,
        data,
        config.val_data[0],
        loop,
        workdir,
        device,
        on_progress,
        should_cancel,
        stage="training",
    )
    save_model(model.to(torch.device("cpu")), workdir / "model")
    (workdir / "training.json").write_text(result.model_dump_json(indent=2))
    return result
