"""Over-parameterized training (core.models.overparam): the folded model is the architecture it names
and computes what the over-parameterized one computed."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from core.data.datasets import TrainImages
from core.distill.stage import DistillConfig, run_distill
from core.models.build import build_model
from core.models.config import RLFNConfig
from core.models.overparam import fold, overparameterize


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(RLFNConfig(scale=2, channels=8, num_blocks=2, convs_per_block=1)).eval()


def test_starts_as_the_same_function_and_folds_to_the_same_function():
    plain = _student()
    x = torch.rand(2, 3, 20, 20)
    expanded = copy.deepcopy(plain)
    assert overparameterize(expanded, 2.0) == 9  # conv_1, 2 × (c1_r, ESA conv2, conv3), conv_2, upsampler
    torch.testing.assert_close(expanded(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():  # as after training: every branch non-zero
        for name, p in expanded.named_parameters():
            if ".parametrizations." in name:
                p.add_(0.05 * torch.randn_like(p))
    before = expanded(x)
    assert (before - plain(x)).abs().max() > 1e-3
    folded = fold(expanded)
    assert set(folded.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(folded(x), before, rtol=1e-5, atol=1e-5)


def test_run_distill_trains_the_branches_and_returns_a_plain_model(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48), Image.BICUBIC).save(tmp_path / f"{i}.png")
    data = TrainImages.from_folders(tmp_path, 2, lr_patch=16, batch_size=2, seed=0)
    config = DistillConfig(iterations=6, loss="l1_gt", lr=1e-3, validate_every=0, overparam=1.0)
    trained, result = run_distill(_student(), None, data, None, config, tmp_path / "run", torch.device("cpu"))
    assert result.iterations == 6
    assert set(trained.state_dict()) == set(_student().state_dict())
    assert not torch.equal(trained.conv_1.weight, _student().conv_1.weight)
