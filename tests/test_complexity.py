"""Complexity under srcompress's convention (method.md §8): params +- RPB, FlopCounterMode MACs."""

import pytest
import torch
from torch import nn

from core.complexity import ParamCount, count_macs, count_params, default_lr_size
from core.errors import UserError
from core.models.build import create_model
from core.models.presets import preset_config


def meta_model(name: str, scale: int = 2, **overrides) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, scale, **overrides)


# x2 at LR 640x360: (params all, params excl. RPB, GMACs), method.md §8 "srcompress figures".
TABLE = {
    "edsr": (40_729_603, 40_729_603, 9384.75),
    "edsr_baseline": (1_369_859, 1_369_859, 316.25),
    "edsr_mini": (49_603, 49_603, 11.65),
    "swinir": (11_752_487, 11_703_887, 2871.88),
    "swinir_lightweight": (910_152, 877_752, 240.91),
    "swinir_mini": (98_868, 82_668, 26.76),
    "rlfn": (526_856, 526_856, 115.42),
    "rlfn_s": (454_620, 454_620, 98.80),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLE))
def test_x2_presets_match_the_reference_figures(name):
    total, excl_rpb, gmacs = TABLE[name]
    model = meta_model(name)
    assert count_params(model) == ParamCount(total, excl_rpb)
    macs = count_macs(model)
    print(f"{name}: {macs.gmacs:.3f} GMACs { ({k: round(v / 1e9, 2) for k, v in macs.by_op.items()}) }")
    assert macs.lr_size == (640, 360)
    assert macs.flops == 2 * macs.macs
    assert macs.gmacs == pytest.approx(gmacs, rel=5e-3)
    assert sum(macs.by_op.values()) == macs.macs


@pytest.mark.parametrize(
    ("name", "split"),
    [("swinir_lightweight", (39.19, 159.25, 42.47)), ("swinir_mini", (5.52, 12.74, 8.49))],
)
def test_swinir_per_op_split(name, split):
    """Regression guard for the attention matmuls (CPU SDPA would count 0, pytorch#195460)."""
    by_op = count_macs(meta_model(name)).by_op
    assert set(by_op) == {"conv", "linear", "bmm"}
    for op, expected in zip(("conv", "linear", "bmm"), split, strict=True):
        assert by_op[op] / 1e9 == pytest.approx(expected, abs=0.01)


def test_convolution_only_families_count_only_convs():
    assert set(count_macs(meta_model("edsr_baseline")).by_op) == {"conv"}
    assert set(count_macs(meta_model("rlfn_s")).by_op) == {"conv"}


def test_edsr_baseline_macs_are_exact_conv_macs():
    """316.25 G is the exact sum of conv MACs at 640x360 (Table I's 316.3)."""
    c, b, pixels = 64, 16, 640 * 360
    per_pixel = (
        27 * c + (2 * b + 1) * 9 * c * c + 9 * c * 4 * c + 4 * 9 * c * 3
    )  # head, body, up, tail (at 2x)
    assert count_macs(meta_model("edsr_baseline")).macs == pixels * per_pixel


@pytest.mark.parametrize(
    ("name", "scale", "lr_size", "overrides"),
    [
        ("edsr_mini", 3, (25, 19), {}),
        ("swinir_mini", 2, (20, 13), {}),
        ("swinir", 4, (12, 8), {"embed_dim": 24, "depths": (2, 2), "num_heads": 6}),  # classical tail
        ("rlfn_s", 4, (21, 17), {}),
    ],
)
@pytest.mark.slow
def test_meta_counts_equal_real_counts(name, scale, lr_size, overrides):
    real = create_model(name, scale, **overrides)
    assert count_macs(real, lr_size, on_meta=True) == count_macs(real, lr_size, on_meta=False)


@pytest.mark.slow
def test_swinir_x4_counts_its_padding():
    """LR 320x180 is padded to 320x184 inside SwinIR; the counted forward includes the padded rows."""
    model = meta_model("swinir_lightweight", 4)
    padded = count_macs(model, (320, 180))
    assert padded.lr_size == (320, 180)
    assert padded.macs == count_macs(model, (320, 184)).macs
    assert padded.macs > count_macs(model, (320, 176)).macs


def test_default_lr_sizes():
    assert [default_lr_size(s) for s in (2, 3, 4)] == [(640, 360), (427, 240), (320, 180)]
    assert count_macs(meta_model("edsr_mini", 3)).lr_size == (427, 240)
    with pytest.raises(UserError, match="no default LR size for scale 8"):
        default_lr_size(8)


@pytest.mark.slow
def test_count_macs_keeps_the_callers_model_untouched():
    model = create_model("rlfn_s", 2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (32, 32), on_meta=False)
    count_macs(model, (32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"


def test_models_without_config_are_counted_on_a_meta_copy():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    macs = count_macs(plain, (4, 4))
    assert macs.by_op == {"conv": 16 * 8 * 27, "linear": 8 * 16 * 5}
    assert next(plain.parameters()).device.type == "cpu"


def test_param_count_excludes_only_rpb_tables():
    counts = count_params(meta_model("swinir_mini"))
    assert counts.total - counts.excl_rpb == 3 * 4 * 225 * 6
    edsr_pytorch_style = create_model("edsr_baseline", 2, mean_convs=True)
    assert count_params(edsr_pytorch_style).total == 1_369_859 + 24  # the two MeanShift 1x1 convs
    assert preset_config("edsr_baseline", 2).triple == (64, 1, 16)
