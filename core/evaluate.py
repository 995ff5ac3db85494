"""Evaluate a model (or bicubic) on a dataset folder with the conventions of method.md §6."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.data.datasets import EvalImage, EvalResult, bicubic_upscale, evaluate
from core.models.network import eval_mode


def model_upscaler(
    model: nn.Module, device: torch.device | str = "cpu"
) -> Callable[[np.ndarray], np.ndarray]:
    """LR uint8 HxWx3 → SR float HxWx3 in [0, 1] (unclamped: scoring quantizes), whole image, fp32."""
    device = torch.device(device)

    @torch.inference_mode()
    def upscale(lr: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))).float().div_(255).unsqueeze(0)
        return model(x.to(device))[0].permute(1, 2, 0).float().cpu().numpy()

    return upscale


def evaluate_dataset(
    model: nn.Module,
    dataset: Path | Sequence[EvalImage],
    scale: int,
    device: torch.device | str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
    name: str | None = None,
) -> EvalResult:
    """Score a model on a folder or on images in memory (see core.data.datasets.evaluate)."""
    with eval_mode(model):
        return evaluate(model_upscaler(model, device), dataset, scale, on_progress=on_progress, name=name)


def evaluate_model(
    name: str,
    scale: int,
    weights: Path | None,
    dataset_dir: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """`name` is a preset (with `weights`) or "bicubic" (MATLAB bicubic of the LR file)."""
    if name == "bicubic":
        return evaluate(lambda lr: bicubic_upscale(lr, scale), dataset_dir, scale, on_progress=on_progress)
    from core.models.build import create_model
    from core.models.checkpoint import load_checkpoint

    model = (
        create_model(name, scale)
        if weights is None
        else load_checkpoint(weights, preset=name, scale=scale)[0]
    )
    return evaluate_dataset(model, dataset_dir, scale, on_progress=on_progress)
