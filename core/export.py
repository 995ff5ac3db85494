"""Export a trained model: safetensors + config JSON (the canonical artifact) and ONNX with parity."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.models.checkpoint import save_model
from core.models.config import ONNX_FILE
from core.onnx_export import export_onnx, onnx_parity
from core.results import ExportResult

# (width, height) traced for the ONNX export and its parity check. Square: a graph fixed to its traced
# size (SwinIR) serves any image as overlapping tiles of this size (core.quantize.runtimes).
EXPORT_LR_SIZE = (64, 64)


def export_model(model: nn.Module, out_dir: Path) -> ExportResult:
    """Write `model.safetensors`, `config.json` and `model.onnx` into `out_dir`; check ONNX parity."""
    model = model.cpu().eval()
    save_model(model, out_dir)
    # Non-dynamic exports (SwinIR) are made for the parity size; dynamic ones accept any size.
    onnx = export_onnx(model, out_dir / ONNX_FILE, example_lr_size=EXPORT_LR_SIZE)
    width, height = EXPORT_LR_SIZE
    lr = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    diff = onnx_parity(model, onnx.path, lr)
    return ExportResult(
        weights="model.safetensors",
        config="config.json",
        onnx=onnx.path.name,
        onnx_dynamic_shapes=onnx.dynamic,
        onnx_lr_size=onnx.lr_size,
        onnx_opset=onnx.opset,
        onnx_max_abs_diff=diff,
    )
