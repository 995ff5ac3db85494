"""ONNX export: DepthToSpace CRD, dynamic axes where allowed, parity with PyTorch (method.md §9)."""

from __future__ import annotations

import pytest
import torch

from core.models.build import create_model
from core.onnx_export import depth_to_space_modes, export_onnx, onnx_parity, ort_session

PARITY_TOLERANCE = 1e-4


def random_lr(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("preset", "scale"), [("edsr_mini", 2), ("rlfn_s", 2), ("edsr_mini", 3), ("edsr_mini", 4)]
)
@pytest.mark.slow
def test_convolutional_models_export_dynamic_with_parity(preset, scale, tmp_path):
    torch.manual_seed(0)
    model = create_model(preset, scale).eval()
    export = export_onnx(model, tmp_path / "model.onnx", example_lr_size=(64, 48))
    assert export.dynamic and export.path.is_file() and export.lr_size == (64, 48)
    # PixelShuffle(s) -> DepthToSpace CRD: one for x2/x3 (also RLFN's direct upsampler), two for x4.
    assert depth_to_space_modes(export.path) == ["CRD"] * (2 if scale == 4 else 1)
    traced = onnx_parity(model, export.path, random_lr(1, 48, 64))
    other = onnx_parity(model, export.path, random_lr(2, 40, 56, seed=1))  # another batch and size
    print(f"{preset} x{scale}: max |ORT - torch| {traced:.2e} at the traced size, {other:.2e} at 2x56x40")
    assert traced < PARITY_TOLERANCE and other < PARITY_TOLERANCE


@pytest.mark.slow
def test_swinir_exports_per_size_with_parity(tmp_path):
    torch.manual_seed(0)
    model = create_model("swinir_mini", 2).eval()
    export = export_onnx(model, tmp_path / "swinir.onnx", example_lr_size=(28, 20))  # pads to 32x24 inside
    assert not export.dynamic  # the shift mask and padding are traced for this size only
    assert depth_to_space_modes(export.path) == ["CRD"]
    diff = onnx_parity(model, export.path, random_lr(1, 20, 28))
    print(f"swinir_mini x2 (fixed 28x20): max |ORT - torch| {diff:.2e}")
    assert diff < PARITY_TOLERANCE
    session = ort_session(export.path)
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own exception types vary by version
        session.run(None, {"lr": random_lr(1, 24, 24).numpy()})


def test_export_restores_training_mode_and_rejects_bad_sizes(tmp_path):
    model = create_model("edsr_mini", 2)
    model.train()
    export_onnx(model, tmp_path / "m.onnx", example_lr_size=(16, 16))
    assert model.training
    with pytest.raises(ValueError):
        export_onnx(model, tmp_path / "bad.onnx", example_lr_size=(0, 16))
    with pytest.raises(ValueError):
        onnx_parity(model, tmp_path / "m.onnx", torch.rand(3, 16, 16))
    assert not list(tmp_path.glob(".*partial"))
