"""Backend choice: which runner is fastest on this machine while keeping the Y-PSNR within 0.05 dB of
fp32 — measured once per model and machine, cached as JSON; and `prepare_backend`, which resolves a
backend name (or 'auto') to a runner."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import UserError
from core.infer.runners import (
    BACKENDS,
    OnnxRuntimeRunner,
    Runner,
    TorchRunner,
    default_cache_dir,
    model_fingerprint,
    model_scale,
)
from core.infer.tiling import upscale_padded
from core.loop import cpu_has_fast_bf16
from core.models.network import model_config, model_device, model_family

log = logging.getLogger(__name__)

QUICK_PROBE_SECONDS = 0.15  # eager time on LR 128x128 under which backends are timed on …
QUICK_MODEL_TIMING_SIZE = (640, 360)  # … this LR (width, height)
PSNR_TOLERANCE_DB = 0.05  # a fast backend is accepted when its Y-PSNR is this close to fp32's
DECISION_VERSION = 5  # bump when the decision procedure changes, so stale cached decisions are ignored


def prepare_backend(
    model: nn.Module,
    backend: str | None = "eager",
    cache_dir: str | Path | None = None,
    formats: dict[str, Runner] | None = None,
) -> Runner:
    """A reusable runner for `backend` ('auto' runs `choose_backend`). Reuse it across images to keep
    ONNX Runtime sessions and channels-last copies warm. `formats`: runners of the model's exported
    formats (core.quantize.runtimes, by format name), which are backends too."""
    name = backend or "eager"
    formats = formats or {}
    if name == "auto":
        name = choose_backend(model, cache_dir, formats=formats)
    if name in formats:
        return formats[name]
    if name == "onnxruntime":
        return OnnxRuntimeRunner(model, cache_dir)
    if name in BACKENDS:
        return TorchRunner(model, name)
    raise UserError(f"unknown backend {backend!r}; use auto or one of {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------------------ backend choice


@dataclass
class BackendTrial:
    """One candidate's measurements: latency on the timing input, Y-PSNR on the evaluation set."""

    backend: str
    seconds: float  # median latency on the timing input
    speedup: float  # eager seconds / these seconds
    psnr: float | None = None  # mean Y-PSNR (quantized output vs ground truth); None if not evaluated
    accepted: bool = False
    reason: str = ""


@dataclass
class BackendDecision:
    """What `choose_backend` decided and why; stored as JSON in the cache."""

    backend: str
    key: str
    model_fingerprint: str
    family: str
    eval_set: str
    psnr_fp32: float | None
    trials: list[BackendTrial] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    timing_lr_size: tuple[int, int] = (128, 128)  # (width, height) of the timing input
    version: int = DECISION_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def machine_signature() -> dict[str, str]:
    """What makes timings machine-specific: CPU model, threads, library versions, GPU if any."""
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def candidate_backends(model: nn.Module) -> list[str]:
    """Fast paths worth measuring for this model on its device (eager is the baseline, always allowed).

    fp16 only on CUDA and never for SwinIR; bf16 on CUDA or a CPU with native bf16; ONNX Runtime on CPU.
    """
    device = model_device(model)
    config = model_config(model)
    candidates = ["channels_last", "sdpa"] if config.windowed_attention else ["channels_last"]
    if device.type == "cuda":
        candidates.append("bf16")
        if config.fp16_safe:
            candidates.append("fp16")
    else:
        if cpu_has_fast_bf16():
            candidates.append("bf16")
        candidates.append("onnxruntime")
    return candidates


def time_runners(runners: dict[str, Runner], lr: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Fastest of `repeats` calls per runner, after one warm-up call each (which also builds lazy state
    such as an ONNX export). Runners take turns in each round, and the minimum (not the median) is kept:
    other processes on a shared machine only ever add time, and a burst of load then hits every
    candidate alike instead of deciding the choice."""
    for runner in runners.values():
        runner(lr)
    best = dict.fromkeys(runners, math.inf)
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(lr)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def mean_psnr(
    model: nn.Module, runner: Runner, images: Iterable[tuple[str, np.ndarray, np.ndarray]]
) -> float:
    """Mean Y-PSNR (crop = scale, quantized SR vs uint8 HR) of `runner`'s whole-image outputs."""
    from core.metrics import psnr_y, quantize

    scale = model_scale(model)
    values = []
    for _name, hr, lr in images:
        sr = upscale_padded(model, runner, lr.astype(np.float32) / 255.0, tile=None, overlap=32)
        values.append(psnr_y(quantize(sr), hr[: sr.shape[0], : sr.shape[1]], scale))
    return float(np.mean(values))


def _eval_images(model: nn.Module, eval_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from core.data.datasets import load_eval_set

    return [(image.name, image.hr, image.lr) for image in load_eval_set(eval_dir, model_scale(model))]


def default_timing_size(eager: Runner) -> tuple[int, int]:
    """LR (width, height) for timing the backends: 640x360 when one eager pass on 128x128 is quick,
    else 128x128 to keep the measurement short.

    Small models' ranking shifts with size: per-call overheads weigh more on small inputs, and cache
    effects on large ones (edsr_mini x2 here: channels-last and ONNX Runtime tie at 256x256, ONNX
    Runtime is 1.45x faster at 640x360). 640x360 is the size MACs are stated at (a 720p output) and
    about the pixel count of the largest auto tile (512x512), so it ranks paths as they serve."""
    probe = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    eager(probe)  # warm-up
    start = time.perf_counter()
    eager(probe)
    return QUICK_MODEL_TIMING_SIZE if time.perf_counter() - start < QUICK_PROBE_SECONDS else (128, 128)


def measure_backends(
    model: nn.Module,
    cache_dir: str | Path | None = None,
    *,
    eval_dir: str | Path | None = None,
    candidates: Iterable[str] | None = None,
    timing_lr_size: tuple[int, int] | None = None,
    formats: dict[str, Runner] | None = None,
) -> BackendDecision:
    """Time eager and each candidate; evaluate the faster ones; pick the fastest within 0.05 dB of fp32.

    eval_dir: an evaluation set (benchmark layout or a folder of HR images) the caller names; default
    the bundled sample set (core never goes looking for data of its own). formats: runners of exported
    formats (int8, fp16, OpenVINO...), candidates like the PyTorch paths and held to the same 0.05 dB.
    """
    formats = formats or {}
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    names = list(candidate_backends(model) if candidates is None else candidates) + list(formats)
    if not model_config(model).fp16_safe and "fp16" in names:
        names.remove("fp16")  # never fp16 for SwinIR, even when asked
    if eval_dir is None:
        from core.data.sample import sample_dir

        eval_dir = sample_dir(cache_dir / "samples")
    eval_dir = Path(eval_dir)

    eager = prepare_backend(model, "eager", cache_dir)
    width, height = timing_lr_size or default_timing_size(eager)
    lr = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    runners: dict[str, Runner] = {"eager": eager}
    unavailable: dict[str, str] = {}
    for name in names:
        try:
            runners[name] = prepare_backend(model, name, cache_dir, formats)
        except UserError as error:
            unavailable[name] = str(error)
    seconds = time_runners(runners, lr)
    eager_seconds = seconds["eager"]
    trials = [BackendTrial("eager", eager_seconds, 1.0, accepted=True, reason="fp32 reference")]
    for name in names:
        if name in unavailable:
            trials.append(BackendTrial(name, math.inf, 0.0, reason=f"unavailable: {unavailable[name]}"))
        else:
            trials.append(BackendTrial(name, seconds[name], eager_seconds / seconds[name]))

    faster = [t for t in trials[1:] if t.seconds < 0.95 * eager_seconds]  # 5% margin against timing noise
    for trial in trials[1:]:
        if trial not in faster and not trial.reason:
            trial.reason = f"not faster than eager ({trial.speedup:.2f}x)"
    psnr_fp32 = None
    if faster:
        images = _eval_images(model, eval_dir)
        psnr_fp32 = mean_psnr(model, eager, images)
        trials[0].psnr = psnr_fp32
        for trial in faster:
            trial.psnr = mean_psnr(model, runners[trial.backend], images)
            drift = abs(trial.psnr - psnr_fp32)
            trial.accepted = drift <= PSNR_TOLERANCE_DB
            trial.reason = f"{trial.speedup:.2f}x faster, |dPSNR| {drift:.4f} dB" + (
                "" if trial.accepted else f" > {PSNR_TOLERANCE_DB}"
            )
    best = min((t for t in trials if t.accepted), key=lambda t: t.seconds)
    fingerprint = model_fingerprint(model)
    machine = machine_signature()
    return BackendDecision(
        backend=best.backend,
        key=decision_key(fingerprint, machine, formats),
        model_fingerprint=fingerprint,
        family=model_family(model),
        eval_set=str(eval_dir),
        psnr_fp32=psnr_fp32,
        trials=trials,
        machine=machine,
        timing_lr_size=(width, height),
    )


def decision_key(fingerprint: str, machine: dict[str, str], formats: Iterable[str] = ()) -> str:
    """Cache key: model fingerprint + a hash of the machine signature, the decision version and the
    exported formats that were candidates."""
    machine_hash = hashlib.sha256(
        json.dumps([machine, DECISION_VERSION, sorted(formats)], sort_keys=True).encode()
    ).hexdigest()
    return f"{fingerprint}-{machine_hash[:8]}"


def decision_path(model: nn.Module, cache_dir: str | Path | None = None, formats: Iterable[str] = ()) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = decision_key(model_fingerprint(model), machine_signature(), formats)
    return cache_dir / "backend" / f"{key}.json"


def cached_backend(
    model: nn.Module, cache_dir: str | Path | None = None, formats: Iterable[str] = ()
) -> str | None:
    """The backend `choose_backend` already decided for this model on this machine, or None (cheap)."""
    formats = list(formats)
    path = decision_path(model, cache_dir, formats)
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable backend decision %s", path)
        return None
    if cached.get("version") == DECISION_VERSION and cached.get("backend") in (*BACKENDS, *formats):
        return str(cached["backend"])
    return None


def choose_backend(
    model: nn.Module,
    cache_dir: str | Path | None = None,
    formats: dict[str, Runner] | None = None,
    **measure_options,
) -> str:
    """The fastest backend whose Y-PSNR stays within 0.05 dB of fp32 for this model on this machine.

    Measured once per (model config + weights, machine) and cached as JSON under cache_dir/backend/;
    later calls read the file. `measure_options` go to `measure_backends` (eval_dir, candidates, ...).
    """
    formats = formats or {}
    cached = cached_backend(model, cache_dir, formats)
    if cached is not None:
        return cached
    decision = measure_backends(model, cache_dir, formats=formats, **measure_options)
    path = decision_path(model, cache_dir, formats)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(decision.to_json())
    os.replace(partial, path)
    log.info("backend for %s: %s", decision.family, decision.backend)
    return decision.backend
