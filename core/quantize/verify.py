"""Verify a format against the fp32 PyTorch model: parity, quality against HR, latency.

- `parity_db`: PSNR of the format's output against fp32's (float, clipped to [0, 1], RGB, every pixel
  of every verification image pooled). fp32 runtimes land above 90 dB, fp16 around 60, int8 around 45.
- `quality_cost_db`: fp32's mean PSNR-Y against HR minus the format's (what a user gives up).
- `latency_ms`: median of a few batch-1 calls at one LR size, after a warm-up call.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.data.datasets import EvalImage
from core.infer.runners import Runner
from core.infer.tiling import upscale_padded
from core.metrics import psnr_y, quantize, ssim_y

MAX_PARITY_DB = 200.0  # identical outputs: a finite stand-in for an infinite PSNR
LATENCY_RUNS = 3


@dataclass(frozen=True)
class Outputs:
    """SR outputs (float HxWx3 in [0, 1]) of one runner on the verification images, with their scores."""

    images: list[np.ndarray]
    psnr: float
    ssim: float


def run_on(model: nn.Module, runner: Runner, images: Sequence[EvalImage], scale: int) -> Outputs:
    """`runner` on every whole image (padded as the model needs), scored with the project's conventions."""
    outputs, psnrs, ssims = [], [], []
    for image in images:
        sr = upscale_padded(model, runner, image.lr.astype(np.float32) / 255.0, tile=None, overlap=32)
        sr = np.clip(sr, 0.0, 1.0)
        hr = image.hr[: sr.shape[0], : sr.shape[1]]
        outputs.append(sr)
        psnrs.append(psnr_y(quantize(sr), hr, scale))
        ssims.append(ssim_y(quantize(sr), hr, scale))
    return Outputs(outputs, float(np.mean(psnrs)), float(np.mean(ssims)))


def parity_db(reference: Outputs, candidate: Outputs) -> float:
    """PSNR (peak 1) of `candidate`'s outputs against `reference`'s, all pixels pooled."""
    squared = sum(
        float(np.sum((a - b) ** 2)) for a, b in zip(reference.images, candidate.images, strict=True)
    )
    count = sum(a.size for a in reference.images)
    mse = squared / count
    return MAX_PARITY_DB if mse == 0 else min(MAX_PARITY_DB, 10 * math.log10(1.0 / mse))


@torch.inference_mode()
def latency_ms(runner: Runner, lr_size: tuple[int, int]) -> float:
    """Median batch-1 latency (ms) at LR (width, height), after one warm-up call."""
    width, height = lr_size
    lr = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    runner(lr)
    times = []
    for _ in range(LATENCY_RUNS):
        began = time.perf_counter()
        runner(lr)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)
