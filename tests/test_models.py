"""Model zoo: preset sizes and closed forms (method.md §2.3), official structure, forward semantics."""

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from core.models.build import build_model, create_model, deep_feature_weights
from core.models.config import EDSRConfig, RLFNConfig, SwinIRConfig, parse_config
from core.models.edsr import DIV2K_RGB_MEAN
from core.models.presets import PRESETS, preset_config
from core.models.swinir import relative_position_index, shifted_window_mask, window_partition, window_reverse


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, scale: int, **overrides) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: the 40M/11.7M presets cost nothing
        return create_model(name, scale, **overrides)


# (preset, scale) -> (params with RPB, params without RPB), measured figures of method.md §2.3.
PRESET_PARAMS = {
    ("edsr", 2): (40_729_603, 40_729_603),
    ("edsr", 4): (43_089_923, 43_089_923),
    ("edsr_baseline", 2): (1_369_859, 1_369_859),
    ("edsr_baseline", 3): (1_554_499, 1_554_499),
    ("edsr_baseline", 4): (1_517_571, 1_517_571),
    ("edsr_mini", 2): (49_603, 49_603),
    ("edsr_mini", 4): (58_883, 58_883),
    ("swinir", 2): (11_752_487, 11_703_887),
    ("swinir", 4): (11_900_199, None),
    ("swinir_lightweight", 2): (910_152, 877_752),
    ("swinir_lightweight", 3): (918_267, None),
    ("swinir_lightweight", 4): (929_628, 897_228),
    ("swinir_mini", 2): (98_868, 82_668),
    ("swinir_mini", 4): (106_680, None),
    ("rlfn", 2): (526_856, 526_856),
    ("rlfn_s", 2): (454_620, 454_620),
}


@pytest.mark.parametrize(("name", "scale"), list(PRESET_PARAMS))
def test_preset_parameter_counts(name, scale):
    total, excl_rpb = PRESET_PARAMS[(name, scale)]
    model = meta_model(name, scale)
    assert n_params(model) == total
    if excl_rpb is not None:
        rpb = sum(
            p.numel() for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")
        )
        assert total - rpb == excl_rpb


def edsr_closed_form(c: int, b: int, scale: int) -> int:
    upsample = {2: 36 * c * c + 4 * c, 3: 81 * c * c + 9 * c, 4: 72 * c * c + 8 * c}[scale]
    return 28 * c + (2 * b + 1) * (9 * c * c + c) + upsample + 27 * c + 3


def swinir_direct_closed_form(c: int, n_b: int, n_l: int, heads: int, scale: int) -> int:
    deep = n_b * (n_l * (8 * c * c + 11 * c + 225 * heads) + 9 * c * c + c)
    return 32 * c + deep + 9 * c * c + c + 27 * c * scale**2 + 3 * scale**2


def rlfn_closed_form(c: int, scale: int) -> int:
    return 28 * c + 6 * (28 * c * c + 37 * c + 4928) + (9 * c * c + c) + (27 * c * scale**2 + 3 * scale**2)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("c", "b"), [(64, 16), (16, 8), (24, 5), (256, 32)])
def test_edsr_closed_form(c, b, scale):
    with torch.device("meta"):
        model = build_model(EDSRConfig(scale=scale, num_feat=c, num_block=b))
    assert n_params(model) == edsr_closed_form(c, b, scale)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("c", "n_b", "n_l"), [(60, 4, 6), (24, 3, 4), (36, 2, 5), (12, 1, 1)])
def test_swinir_closed_form(c, n_b, n_l, scale):
    config = SwinIRConfig(scale=scale, embed_dim=c, depths=(n_l,) * n_b, num_heads=6)
    with torch.device("meta"):
        model = build_model(config)
    assert n_params(model) == swinir_direct_closed_form(c, n_b, n_l, 6, scale)
    rpb = sum(p.numel() for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))
    assert rpb == n_b * n_l * 225 * 6


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("c", [52, 48, 20])
def test_rlfn_closed_form(c, scale):
    with torch.device("meta"):
        model = build_model(RLFNConfig(scale=scale, channels=c))
    if c >= 16:  # the closed form has ESA f = 16 baked in
        assert n_params(model) == rlfn_closed_form(c, scale)


@pytest.mark.slow
def test_official_key_names_and_entry_counts():
    edsr = create_model("edsr_baseline", 2).state_dict()
    assert {"conv_first.weight", "body.15.conv2.bias", "conv_after_body.weight", "upsample.0.weight"} <= set(
        edsr
    )
    assert "conv_last.weight" in edsr and "upsample.2.weight" not in edsr
    assert "mean" not in edsr  # BasicSR keeps the mean out of the state_dict
    assert "upsample.2.weight" in create_model("edsr_mini", 4).state_dict()

    # Entry counts of the official SwinIR files (method.md §2.4), buffers included.
    assert len(meta_model("swinir_lightweight", 2).state_dict()) == 366
    assert len(meta_model("swinir_mini", 2).state_dict()) == 190
    assert len(meta_model("swinir", 2).state_dict()) == 548
    swin = meta_model("swinir_lightweight", 2).state_dict()
    prefix = "layers.3.residual_group.blocks.5."
    assert swin[prefix + "attn.relative_position_bias_table"].shape == (225, 6)
    assert swin[prefix + "attn.relative_position_index"].dtype == torch.int64
    assert swin[prefix + "attn_mask"].shape == (64, 64, 64)
    assert "layers.0.residual_group.blocks.0.attn_mask" not in swin  # even blocks do not shift
    assert {"patch_embed.norm.weight", "norm.bias", "layers.3.conv.weight", "upsample.0.weight"} <= set(swin)
    classical = meta_model("swinir", 2).state_dict()
    assert {"conv_before_upsample.0.weight", "upsample.0.weight", "conv_last.weight"} <= set(classical)

    rlfn = create_model("rlfn_s", 2).state_dict()
    assert len(rlfn) == 114
    assert {"block_6.esa.conv_f.weight", "block_1.c3_r.bias", "upsampler.0.weight", "conv_2.bias"} <= set(
        rlfn
    )
    small = create_model("rlfn", 2, num_blocks=4, convs_per_block=2, channels=12).state_dict()
    assert (
        "block_4.c2_r.weight" in small
        and "block_1.c3_r.weight" not in small
        and "block_5.c5.weight" not in small
    )
    assert small["block_1.esa.conv1.weight"].shape == (12, 12, 1, 1)  # f = min(16, channels)


def test_swinir_relative_position_index_and_mask():
    index = relative_position_index(8)
    assert index.shape == (64, 64) and index.dtype == torch.int64
    assert index[0, 0] == 7 * 15 + 7  # same token: (dy, dx) = (0, 0)
    assert index[0, 63] == 0  # token (0,0) vs (7,7): (dy, dx) = (-7, -7)
    assert index[63, 0] == 224
    mask = shifted_window_mask(64, 64, 8, 4)
    assert mask.shape == (64, 64, 64) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    assert (mask[0] == 0).all()  # interior windows see a single region
    assert (mask[-1] == -100).sum() == 64 * 64 - 4 * 16 * 16  # corner window: 4 regions of 16 tokens
    assert shifted_window_mask(48, 48, 8, 4).shape == (36, 64, 64)

    x = torch.randn(2, 16, 24, 5)
    assert torch.equal(window_reverse(window_partition(x, 8), 8, 16, 24), x)


def seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (biases and LayerNorms included) so tests see every term."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * (0.02 if "weight" in name else 0.05))
    return model.eval()


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(
    "config_kwargs",
    [
        {"family": "edsr", "num_feat": 8, "num_block": 2},
        {
            "family": "swinir",
            "embed_dim": 12,
            "depths": (2, 1),
            "num_heads": 3,
            "upsampler": "pixelshuffledirect",
        },
        {"family": "swinir", "embed_dim": 12, "depths": (2,), "num_heads": 2, "upsampler": "pixelshuffle"},
        {"family": "rlfn", "channels": 8, "num_blocks": 2, "convs_per_block": 2},
    ],
)
def test_forward_shapes(config_kwargs, scale):
    model = seeded(build_model(parse_config({**config_kwargs, "scale": scale})))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 17, 21))
    assert out.shape == (1, 3, 17 * scale, 21 * scale)
    assert torch.isfinite(out).all()
    assert model.config.scale == scale


def reference_edsr(model, x):
    """BasicSR's EDSR forward written with functional ops, from the state_dict alone."""
    sd, cfg = model.state_dict(), model.config
    mean = torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1)
    conv = lambda h, key: F.conv2d(h, sd[f"{key}.weight"], sd[f"{key}.bias"], padding=1)
    h = conv((x - mean) * 255.0, "conv_first")
    body = h
    for i in range(cfg.num_block):
        body = body + conv(F.relu(conv(body, f"body.{i}.conv1")), f"body.{i}.conv2") * cfg.res_scale
    h = conv(body, "conv_after_body") + h
    h = F.pixel_shuffle(conv(h, "upsample.0"), 2)
    return conv(h, "conv_last") / 255.0 + mean


@pytest.mark.parametrize("res_scale", [1.0, 2.0, 0.1])
def test_edsr_forward_matches_basicsr_semantics(res_scale):
    model = seeded(create_model("edsr_mini", 2, num_block=3, res_scale=res_scale))
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_edsr(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_zero_network_returns_its_mean_shift():
    """With every weight zero the output is the constant the model adds back: the DIV2K mean or 0."""
    x = torch.rand(1, 3, 16, 16)
    for name, expected in [
        ("edsr_mini", DIV2K_RGB_MEAN),
        ("swinir_mini", DIV2K_RGB_MEAN),
        ("rlfn_s", (0.0, 0.0, 0.0)),
    ]:
        model = create_model(name, 2).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            out = model(x)
        torch.testing.assert_close(out, torch.tensor(expected).view(1, 3, 1, 1).expand_as(out))


def test_swinir_pads_only_when_needed():
    model = seeded(create_model("swinir_mini", 2, depths=(2, 2), num_heads=6))
    aligned = torch.rand(1, 3, 16, 24)
    assert model.pad_to_window(aligned) is aligned
    x = torch.rand(1, 3, 13, 18)
    padded = F.pad(x, (0, 6, 0, 3), mode="reflect")  # what the official 2022 forward does
    with torch.no_grad():
        expected = model(padded)[:, :, :26, :36]
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(UserError, match="too small"):
        model(torch.rand(1, 3, 3, 16))


@pytest.mark.slow
def test_swinir_img_size_only_selects_the_cached_mask():
    """img_size decides which mask is stored; outputs at any size must not depend on it."""
    a = seeded(create_model("swinir_mini", 2, depths=(2, 2), num_heads=6, img_size=32))
    b = create_model("swinir_mini", 2, depths=(2, 2), num_heads=6, img_size=64).eval()
    weights = {k: v for k, v in a.state_dict().items() if not k.endswith("attn_mask")}
    b.load_state_dict(weights, strict=False)
    with torch.no_grad():
        for size in [(32, 32), (64, 64), (40, 24)]:
            x = torch.rand(1, 3, *size)
            torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_swinir_drop_path_only_in_training():
    model = seeded(create_model("swinir_mini", 2, depths=(2, 2), num_heads=6, drop_path_rate=0.5))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        first = model(x)
        assert not torch.equal(first, model(x))


def test_rlfn_rejects_inputs_below_esa_minimum():
    model = create_model("rlfn_s", 2).eval()
    with pytest.raises(UserError, match="at least 15x15"):
        model(torch.rand(1, 3, 14, 40))
    assert model(torch.rand(1, 3, 15, 15)).shape == (1, 3, 30, 30)


def test_triples_and_rebuilds():
    lw = preset_config("swinir_lightweight", 2)
    assert lw.triple == (60, 6, 4)
    assert lw.with_triple(24, 4, 3) == preset_config("swinir_mini", 2)
    baseline = preset_config("edsr_baseline", 2)
    assert baseline.triple == (64, 1, 16)
    assert baseline.with_triple(16, 1, 8) == preset_config("edsr_mini", 2, res_scale=1.0)
    rlfn = preset_config("rlfn", 4)
    assert rlfn.triple == (52, 3, 6)
    assert rlfn.with_triple(12, 2, 4) == RLFNConfig(
        scale=4, channels=12, convs_per_block=2, num_blocks=4, esa_channels=12
    )
    assert rlfn.with_triple(24, 2, 4).esa_channels == 16
    with pytest.raises(UserError, match="multiple of the 6 attention heads"):
        lw.with_triple(25, 4, 3)
    with pytest.raises(UserError, match="N_l = 1"):
        baseline.with_triple(16, 2, 8)
    with pytest.raises(UserError, match="unequal depths"):
        _ = preset_config("swinir_mini", 2, depths=(4, 2), num_heads=6).triple


def test_deep_feature_denominators():
    """method.md §3.3: the tensors counted in the density d."""
    counts = {
        name: sum(t.numel() for t in deep_feature_weights(meta_model(name, 2)).values()) for name in PRESETS
    }
    print("deep-feature weights:", counts)
    assert counts["edsr_baseline"] == 1_216_512
    assert counts["edsr_mini"] == 39_168
    assert counts["swinir_lightweight"] == 823_680
    assert counts["swinir_mini"] == 71_424
    # RLFN: per block 3 convs 9C² + c5 C² + ESA (2Cf + f² + 2·9f²), then conv_2 9C²; f = 16.
    for name, c in [("rlfn", 52), ("rlfn_s", 48)]:
        assert counts[name] == 6 * (28 * c * c + 2 * c * 16 + 19 * 16 * 16) + 9 * c * c
    assert counts["rlfn"] == 517_776 and counts["rlfn_s"] == 446_208

    names = set(deep_feature_weights(meta_model("swinir_mini", 2)))
    assert "layers.0.residual_group.blocks.0.norm1.weight" in names and "layers.2.conv.weight" in names
    assert not any("bias" in n or "relative_position" in n for n in names)
    assert not names & {"conv_after_body.weight", "patch_embed.norm.weight", "norm.weight"}
    assert "conv_after_body.weight" in deep_feature_weights(meta_model("edsr_mini", 2))
    rlfn_names = set(deep_feature_weights(meta_model("rlfn_s", 2)))
    assert "block_3.esa.conv4.weight" in rlfn_names and "conv_2.weight" in rlfn_names
    assert not rlfn_names & {"conv_1.weight", "upsampler.0.weight"}


def test_preset_config_errors_name_the_choices():
    with pytest.raises(UserError, match="unknown preset 'edsr_huge'.*edsr_baseline.*rlfn_s"):
        preset_config("edsr_huge", 2)
    with pytest.raises(UserError, match="scale 8 .*2, 3, 4"):
        preset_config("edsr", 8)
    with pytest.raises(UserError, match="no field num_feats; valid overrides: .*num_feat"):
        preset_config("edsr_mini", 2, num_feats=4)
    with pytest.raises(UserError, match="not divisible by num_heads"):
        preset_config("swinir_mini", 2, embed_dim=25)
    with pytest.raises(UserError, match="num_block"):
        create_model("edsr_mini", 2, num_block=0)
    with pytest.raises(UserError, match="family"):
        preset_config("rlfn", 2, family="edsr")


@pytest.mark.parametrize("name", list(PRESETS))
def test_configs_round_trip_through_json(name):
    config = preset_config(name, 3)
    assert parse_config(config.model_dump_json()) == config
    assert meta_model(name, 3).config == config
