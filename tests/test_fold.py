"""Sub-pixel folding (core.models.fold): conv_last after the last PixelShuffle, run on the LR side."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from core.infer.runners import OnnxRuntimeRunner, TorchRunner
from core.models.build import create_model
from core.models.fold import has_foldable_tail, subpixel_conv, with_folded_tail


@pytest.mark.parametrize("r", [2, 3, 4])
def test_subpixel_conv_equals_conv_after_shuffle(r):
    torch.manual_seed(r)
    conv = nn.Conv2d(5, 3, 3, padding=1).double()
    y = torch.randn(2, 5 * r * r, 7, 9, dtype=torch.float64)  # odd sizes: every border case
    expected = conv(nn.PixelShuffle(r)(y))
    folded = nn.PixelShuffle(r)(subpixel_conv(conv, r)(y))
    assert folded.shape == expected.shape == (2, 3, 7 * r, 9 * r)
    assert (folded - expected).abs().max().item() < 1e-12


def test_subpixel_conv_refuses_other_convs():
    for conv in (nn.Conv2d(4, 3, 5, padding=2), nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.Conv2d(4, 3, 3)):
        with pytest.raises(ValueError, match="3x3, stride 1, padding 1"):
            subpixel_conv(conv, 2)
    with pytest.raises(ValueError, match=">= 2"):
        subpixel_conv(nn.Conv2d(4, 3, 3, padding=1), 1)


@pytest.mark.parametrize(
    ("name", "scale", "overrides"),
    [
        ("edsr_mini", 2, {}),
        ("edsr_mini", 3, {}),
        ("edsr_mini", 4, {}),
        ("swinir", 2, {"embed_dim": 12, "depths": [1], "num_heads": [2], "img_size": 16}),
    ],
)
def test_folded_model_computes_the_same_function(name, scale, overrides):
    torch.manual_seed(0)
    model = create_model(name, scale, **overrides).double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = with_folded_tail(model)
    assert folded is not model and isinstance(folded.conv_last, nn.Identity)
    assert isinstance(model.conv_last, nn.Conv2d)  # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.rand(1, 3, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() < 1e-12


def test_models_without_a_foldable_tail_are_returned_as_they_are():
    for model in (create_model("rlfn_s", 2), create_model("swinir_mini", 2)):
        assert not has_foldable_tail(model)
        assert with_folded_tail(model) is model


def test_fast_backends_run_the_folded_model_and_eager_the_model_itself(tmp_path):
    model = create_model("edsr_mini", 2).eval()
    assert TorchRunner(model, "eager").model is model
    assert isinstance(TorchRunner(model, "channels_last").model.conv_last, nn.Identity)
    runner = OnnxRuntimeRunner(model, tmp_path)
    runner(torch.rand(1, 3, 16, 16))
    graph = onnx.load(str(runner.graph_path(16, 16))).graph
    shuffles = [node for node in graph.node if node.op_type == "DepthToSpace"]
    # the only HR tensor is the 3-channel output: the shuffle's input has 3·2² = 12 channels
    producer = next(node for node in graph.node if shuffles[0].input[0] in node.output)
    weight = next(init for init in graph.initializer if init.name == producer.input[1])
    assert len(shuffles) == 1 and producer.op_type == "Conv" and weight.dims[0] == 12
