"""Export an srcompress model to ONNX and check it against PyTorch with ONNX Runtime (method.md §9).

- The exported graph keeps the model's public interface: input `lr` float32 (N, 3, H, W) in [0, 1],
  output `sr` (N, 3, sH, sW). Mean shifts and the RLFN x255 live inside the graph.
- PixelShuffle exports as `DepthToSpace` in **CRD** mode (column-row-depth), the channel order that
  PixelShuffle and the published upsampling convs use (pitfall 21); `export_onnx` checks it.
- EDSR and RLFN export with dynamic batch/H/W axes, so one file serves every tile shape. SwinIR exports
  for one fixed LR size: its forward builds the shifted-window `attn_mask` and the reflect padding from
  Python ints of the input size, which the tracer freezes into constants, so a SwinIR graph is only
  valid for the size it was traced at. Callers export once per tile shape (core.infer.runners caches them).
- Exporter: torch 2.13 still ships the TorchScript-based exporter (`dynamo=False`, deprecated but
  working); it handles the data-dependent Python in these forwards (SwinIR's mask cache, RLFN's size
  checks) in seconds, so it is used here. The dynamo exporter (onnxscript 0.7) also exports a conv +
  PixelShuffle toy graph as DepthToSpace CRD, but is not used.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from core.models.network import eval_mode, model_config, model_device

OPSET = 17
INPUT_NAME = "lr"
OUTPUT_NAME = "sr"


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the file and the input sizes it accepts."""

    path: Path
    dynamic: bool  # True: any batch/H/W; False: only `lr_size` (batch 1)
    lr_size: tuple[int, int]  # (width, height) of the example input used for tracing
    opset: int


def supports_dynamic_shapes(model: nn.Module) -> bool:
    """Whether one exported graph is valid for every input size (not SwinIR: see the module docstring)."""
    return model_config(model).onnx_dynamic_shapes


def depth_to_space_modes(path: str | Path) -> list[str]:
    """The `mode` attribute of every DepthToSpace node in an ONNX file (ONNX's default is DCR)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    modes = []
    for node in graph.node:
        if node.op_type == "DepthToSpace":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "DCR")
            modes.append(mode)
    return modes


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_lr_size: tuple[int, int] = (64, 64),
    dynamic: bool = True,
) -> OnnxExport:
    """Write `model` as ONNX to `path` (atomically) and return what was written.

    `example_lr_size` is (width, height) of the traced input. `dynamic=True` asks for dynamic batch/H/W
    axes; a model that cannot have them (SwinIR) is exported for `example_lr_size` only, and the result's
    `dynamic` says which happened.
    """
    width, height = (int(v) for v in example_lr_size)
    if width < 1 or height < 1:
        raise ValueError(f"example_lr_size must be positive (width, height), got {example_lr_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = dynamic and supports_dynamic_shapes(model)
    example = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    example = example.to(model_device(model))
    dynamic_axes = (
        {
            INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            OUTPUT_NAME: {0: "batch", 2: "out_height", 3: "out_width"},
        }
        if dynamic
        else None
    )
    # Write next to the target and rename, so a concurrent reader never sees a half-written graph.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with eval_mode(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                model,
                (example,),
                str(partial),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
            )
        modes = depth_to_space_modes(partial)
        if any(mode != "CRD" for mode in modes):
            raise RuntimeError(f"PixelShuffle exported as DepthToSpace {modes}; expected CRD (pitfall 21)")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return OnnxExport(path=path, dynamic=dynamic, lr_size=(width, height), opset=OPSET)


def cpu_cores() -> int:
    """Cores this process may use: physical cores, limited by the CPU affinity mask."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = physical
    return max(1, min(physical, allowed))


def ort_session(path: str | Path, intra_op_threads: int | None = None):
    """An ONNX Runtime CPU session with full graph optimisation and one intra-op thread per core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or cpu_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_parity(model: nn.Module, path: str | Path, lr: torch.Tensor | np.ndarray) -> float:
    """Max |PyTorch fp32 − ONNX Runtime| over the output for one input batch `lr` (N, 3, H, W) in [0, 1]."""
    lr_tensor = torch.as_tensor(lr, dtype=torch.float32)
    if lr_tensor.ndim != 4 or lr_tensor.shape[1] != 3:
        raise ValueError(f"lr must be (N, 3, H, W), got shape {tuple(lr_tensor.shape)}")
    with eval_mode(model), torch.inference_mode():
        expected = model(lr_tensor.to(model_device(model))).float().cpu().numpy()
    session = ort_session(path)
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(lr_tensor.numpy())})[0]
    if actual.shape != expected.shape:
        raise ValueError(f"ONNX output {actual.shape} differs in shape from PyTorch's {expected.shape}")
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
