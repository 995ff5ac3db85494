"""Runners: one model on one backend (eager, channels-last, SDPA, bf16, fp16 or ONNX Runtime), each a
callable from an LR batch to its SR batch; and the facts they key on (scale, weights fingerprint)."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from core.errors import UserError
from core.models.fold import with_folded_tail
from core.models.network import eval_mode, model_config, model_device

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("eager", "channels_last", "sdpa", "bf16", "fp16", "onnxruntime")
MAX_ORT_SESSIONS = 4  # ONNX Runtime sessions kept per runner (SwinIR graphs are per tile shape)
ONNX_GRAPH_VERSION = 2  # bump when the exported inference graph changes (2: folded sub-pixel tail)


# ------------------------------------------------------------------------------------------ helpers


def model_scale(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    scale = getattr(config, "scale", None)
    if not isinstance(scale, int):
        raise UserError("the model has no config.scale; build it with core.models")
    return scale


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) of the architecture config and every state_dict tensor: same weights, same key."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(
        config.model_dump_json().encode() if hasattr(config, "model_dump_json") else repr(config).encode()
    )
    digest.update(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """$SRCOMPRESS_CACHE, else ~/.cache/srcompress."""
    return Path(os.environ.get("SRCOMPRESS_CACHE", Path.home() / ".cache" / "srcompress"))


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/CPU allocator failures from torch, numpy or ONNX Runtime."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    markers = (
        "out of memory",
        "can't allocate memory",
        "cannot allocate memory",
        "failed to allocate",
        "bad_alloc",
    )
    return any(marker in text for marker in markers)


# ------------------------------------------------------------------------------------------ runners


def with_fused_attention(model: nn.Module) -> nn.Module:
    """A copy of `model` whose SwinIR window attentions run through torch's fused SDPA kernel."""
    from core.models.swinir import WindowAttention

    fused = copy.deepcopy(model)
    for module in fused.modules():
        if isinstance(module, WindowAttention):
            module.fused = True
    return fused


class TorchRunner:
    """Runs a PyTorch model on one LR batch: fp32 eager, channels-last, or autocast bf16/fp16."""

    def __init__(self, model: nn.Module, backend: str):
        if backend not in ("eager", "channels_last", "sdpa", "bf16", "fp16"):
            raise ValueError(f"TorchRunner does not run backend {backend!r}")
        self.name = backend
        self.device = model_device(model)
        if backend == "fp16" and not model_config(model).fp16_safe:
            raise UserError(
                "fp16 is never used for SwinIR: its activations overflow to NaN (use bf16 or fp32)"
            )
        if backend == "fp16" and self.device.type != "cuda":
            raise UserError("fp16 inference needs a CUDA model; on CPU use 'bf16' or 'onnxruntime'")
        if backend != "eager":
            model = with_folded_tail(model)  # a copy, or the model itself when there is nothing to fold
        if backend == "channels_last":
            # A copy, so that the caller's model keeps its own memory format.
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if backend == "sdpa":
            model = with_fused_attention(model)  # a copy; a model without window attention is unchanged
        self.model = model
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(backend)
        self.fell_back = False  # set once a low-precision output was not finite; then fp32 for good

    def _forward(self, x: torch.Tensor, low_precision: bool) -> torch.Tensor:
        if low_precision:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.model(x).float()
        return self.model(x).float()

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model), torch.inference_mode():
            x = lr.to(self.device, dtype=torch.float32)
            if self.name == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            low_precision = self.autocast_dtype is not None and not self.fell_back
            y = self._forward(x, low_precision)
            if low_precision and not bool(torch.isfinite(y).all()):
                log.warning("%s output was not finite; falling back to fp32 for this model", self.name)
                self.fell_back = True
                y = self._forward(x, low_precision=False)
            return y.cpu().contiguous()


class OnnxRuntimeRunner:
    """Runs the model's ONNX export with ONNX Runtime; graphs cached on disk, sessions per shape in memory.

    The graph is exported from the model's weights when the runner first needs it (keyed by the
    fingerprint taken at construction): build a new runner after changing the weights.
    """

    name = "onnxruntime"

    def __init__(self, model: nn.Module, cache_dir: str | Path | None = None):
        from core.onnx_export import supports_dynamic_shapes

        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.fingerprint = model_fingerprint(model)  # of the caller's model: the cache key
        self.model = with_folded_tail(model)  # what is exported
        self.dynamic = supports_dynamic_shapes(model)
        self.sessions: dict[str, object] = {}
        self._lock = threading.Lock()  # one export per graph when several threads share this runner

    def graph_path(self, width: int, height: int) -> Path:
        shape = "dynamic" if self.dynamic else f"{width}x{height}"
        return self.cache_dir / "onnx" / f"{self.fingerprint}-{shape}-v{ONNX_GRAPH_VERSION}.onnx"

    def session_for(self, width: int, height: int):
        from core.onnx_export import export_onnx, ort_session

        path = self.graph_path(width, height)
        key = path.name
        with self._lock:
            if key not in self.sessions:
                if not path.is_file():
                    export_onnx(self.model, path, example_lr_size=(width, height), dynamic=self.dynamic)
                while len(self.sessions) >= MAX_ORT_SESSIONS:  # SwinIR: one per shape; keep the newest few
                    self.sessions.pop(next(iter(self.sessions)))
                self.sessions[key] = ort_session(path)
            return self.sessions[key]

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        session = self.session_for(width=lr.shape[3], height=lr.shape[2])
        x = np.ascontiguousarray(lr.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {"lr": x})[0])


class Runner(Protocol):
    """Anything that maps an LR batch (N, 3, H, W) float32 in [0, 1] to its SR batch on the CPU."""

    name: str

    def __call__(self, lr: torch.Tensor) -> torch.Tensor: ...
