"""What every training loop shares: device choice, determinism, EMA, atomic resumable checkpoints.

A stage's checkpoint holds everything its loop needs to continue as if it had never stopped: weights,
EMA, optimizer state (OBProx-SG's step/epoch counters included), the torch RNG (SwinIR's drop-path
draws from it), the iteration and the history so far. Batches are a pure function of (seed, iteration)
(`core.data.TrainImages.batch`), so on CPU with deterministic algorithms a resumed run ends with
bit-identical weights.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import Canceled, UserError

# (stage, fraction of the stage done, latest metrics) -> None
ProgressFn = Callable[[str, float, dict[str, Any]], None]
CancelFn = Callable[[], bool]


def no_progress(stage: str, fraction: float, metrics: dict[str, Any]) -> None:
    """The default progress callback: ignore."""


def never_cancel() -> bool:
    return False


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit device that is missing is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every RNG a stage draws from; with `deterministic`, make CPU/GPU kernels reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class EMA:
    """Exponential moving average of a model's weights (the weights that are validated and exported).

    The decay warms up as min(decay, (1 + step) / (10 + step)): with a flat 0.999 the average of a
    short run (a few thousand steps) would still be mostly the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for averaged, current in zip(self.model.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current.detach(), weight)
        for averaged, current in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a run killed mid-write keeps the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint_state(path: Path) -> dict[str, Any] | None:
    """The stage checkpoint at `path`, or None when the stage has not saved one yet."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_loop(path: Path, iteration: int, began: float, stateful: dict[str, Any], **history: Any) -> None:
    """Checkpoint a training loop: each stateful object's state_dict (model, EMA, optimizer, ...), the RNG,
    the iteration, the seconds since `began` (a perf_counter time) and the loop's history so far."""
    objects = {key: obj.state_dict() for key, obj in stateful.items()}
    seconds = time.perf_counter() - began
    save_checkpoint(
        path, {"iteration": iteration, "seconds": seconds, "rng": rng_state(), **objects, **history}
    )


def resume_loop(path: Path, stateful: dict[str, Any]) -> dict[str, Any] | None:
    """Load a loop's checkpoint (save_loop) into its stateful objects and the RNG; returns the checkpoint
    (iteration, seconds, history) or None when the loop has not saved one yet."""
    state = load_checkpoint_state(path)
    if state is not None:
        for key, obj in stateful.items():
            if key in state:
                obj.load_state_dict(state[key])
        set_rng_state(state["rng"])
    return state


# Channels-last activations: oneDNN's fast path for the small convolutions of SR models (about 1.4x per
# training step on a CPU here); the weights stay ordinary tensors for state_dict and safetensors.
CHANNELS_LAST = torch.channels_last


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch.to(device).contiguous(memory_format=CHANNELS_LAST)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: the only CPUs on which bf16 matmuls beat fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class TrainingPrecision:
    """What a training loop's forward passes run in: autocast to `dtype`, or fp32 when None."""

    name: str  # fp32, bf16 or fp16
    dtype: torch.dtype | None
    reason: str

    @property
    def needs_grad_scaler(self) -> bool:  # fp16 gradients underflow without loss scaling
        return self.dtype == torch.float16


FP32 = "fp32"


def resolve_precision(
    requested: str, device: torch.device, cpu_bf16: bool | None = None, cuda_bf16: bool | None = None
) -> TrainingPrecision:
    """The precision a loop trains in on `device`: `auto` is bf16 (else fp16) autocast on CUDA, and on a
    CPU bf16 autocast where it has native bf16 (AVX512-BF16/AMX: 1.3-1.6x the steps per second and
    +0.11 dB held-out at 8 minutes, bench/RESULTS.md) and fp32 elsewhere; bf16 on a CPU
    without native bf16, and fp16 on any CPU, fall back to fp32 (emulated, they are slower than fp32
    there). The losses and the optimizer always run in fp32."""
    if device.type == "cuda":
        cuda_bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if requested == "auto":
            requested = "bf16" if cuda_bf16 else "fp16"
        if requested == "bf16" and not cuda_bf16:
            return TrainingPrecision(FP32, None, "bf16 requested, but this GPU has no bf16")
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        return TrainingPrecision(requested, dtypes.get(requested), f"autocast on {device}")
    cpu_bf16 = cpu_has_fast_bf16() if cpu_bf16 is None else cpu_bf16
    if requested in ("auto", "bf16"):
        if cpu_bf16:
            return TrainingPrecision("bf16", torch.bfloat16, "autocast; the CPU has native bf16")
        asked = "auto: fp32," if requested == "auto" else "bf16 requested, but"
        return TrainingPrecision(FP32, None, f"{asked} the CPU lacks native bf16 (AVX512-BF16/AMX)")
    if requested == "fp16":
        return TrainingPrecision(FP32, None, "fp16 requested, but fp16 training needs a GPU")
    return TrainingPrecision(FP32, None, "as requested")


def check_cancel(should_cancel: CancelFn) -> None:
    if should_cancel():
        raise Canceled("stopped: the caller asked the stage to stop")


# Batches drawn to measure step times: far past any run's iterations, so measuring draws nothing a run uses.
MEASURE_ITERATION = 10**12


def seconds_per_step(
    step: Callable[[int], None], steps: int = 10, warmup: int = 2, min_seconds: float = 0.0
) -> float:
    """Mean wall time of `step(k)` over at least `steps` calls and `min_seconds`, after `warmup` calls
    (the mean, not the median: a run pays for its slow steps too). The torch RNG is restored
    afterwards, so measuring changes nothing that the run itself draws (resume stays exact)."""
    with torch.random.fork_rng():
        for k in range(warmup):
            step(MEASURE_ITERATION + k)
        began, done = time.perf_counter(), 0
        while done < steps or time.perf_counter() - began < min_seconds:
            step(MEASURE_ITERATION + warmup + done)
            done += 1
        return (time.perf_counter() - began) / done


@dataclass
class LoopEvery:
    """How often a loop logs, validates and checkpoints (in iterations; 0 = never, except at the end)."""

    log: int = 10
    validate: int = 0
    checkpoint: int = 100

    def due(self, what: int, iteration: int, last: int) -> bool:
        return iteration == last or (what > 0 and iteration % what == 0)
