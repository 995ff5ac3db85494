"""The three stages on every family: the paper's compress examples, pruning that really sparsifies,
and a distillation step per family with a frozen teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.compress.stage import CompressConfig, run_compress
from core.data.datasets import TrainImages
from core.distill.stage import DistillConfig, run_distill
from core.models.build import build_model, create_model
from core.models.presets import preset_config
from core.prune.stage import PruneConfig, run_prune


@pytest.mark.parametrize(
    ("preset", "density", "expected", "params"),
    [
        ("edsr_baseline", 0.03, (16, 1, 8), 49_603),
        ("swinir_lightweight", 0.089, (24, 4, 3), 98_868),
    ],
)
@pytest.mark.slow
def test_compress_reproduces_the_papers_students(preset, density, expected, params):
    result = run_compress(preset_config(preset, 2), density, CompressConfig())
    assert tuple(result.chosen) == expected
    assert result.student.params == params  # the paper's EDSRmini / SwinIRmini
    assert not result.pruning_ineffective
    assert result.rule.policy.nb_rounding == "paper-compat"


@pytest.mark.slow
def test_compress_target_mode_and_ineffective_pruning():
    teacher = preset_config("rlfn_s", 2)
    result = run_compress(teacher, 0.998, CompressConfig(target_params=45_000))
    assert result.student.params <= 45_000
    assert result.budget is not None and result.budget.d < 0.2
    assert result.pruning_ineffective and "pruning_ineffective" in result.note
    assert result.rule.triple == teacher.triple  # d = 0.998 alone would keep the teacher
    by_macs = run_compress(teacher, 0.998, CompressConfig(target_gmacs=10.0))
    assert by_macs.student.macs <= 10e9


def test_compress_override_wins():
    result = run_compress(preset_config("edsr_baseline", 2), 0.5, CompressConfig(student=(8, 1, 2)))
    assert tuple(result.chosen) == (8, 1, 2)
    assert result.student_config["num_feat"] == 8 and result.student_config["num_block"] == 2


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> TrainImages:
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):  # smooth random images: structure a model can learn
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48), Image.BICUBIC).save(folder / f"{i}.png")
    return TrainImages.from_folders(folder, 2, lr_patch=16, batch_size=2, seed=0)


TINY = {
    "edsr": {"num_feat": 8, "num_block": 2},
    "swinir": {"embed_dim": 12, "depths": [2], "num_heads": 6},
    "rlfn": {"channels": 8, "num_blocks": 2},
}
PRESET = {"edsr": "edsr_mini", "swinir": "swinir_mini", "rlfn": "rlfn_s"}


@pytest.mark.parametrize("family", ["edsr", "swinir", "rlfn"])
def test_prune_with_a_strong_lambda_zeroes_weights(family, patches, tmp_path):
    torch.manual_seed(0)
    teacher = create_model(PRESET[family], 2, **TINY[family])
    config = PruneConfig(iterations=4, lambda_=5.0, lr=5e-3, checkpoint_every=2)
    pruned, result = run_prune(teacher, patches, config, tmp_path, torch.device("cpu"))
    assert result.density < 0.9  # lr·λ = 0.025 soft-thresholds most small weights
    assert 0 < result.nonzero_weights < result.counted_weights
    assert len(result.curve) == 1 and result.curve[0].density == pytest.approx(result.density)
    assert all(0 <= d <= 1 for d in result.per_layer_density.values())
    # the teacher itself is untouched
    assert all(
        bool((p != 0).all()) or p.numel() == 0
        for n, p in teacher.named_parameters()
        if n.endswith("weight") and p.ndim == 4
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["edsr", "swinir", "rlfn"])
@pytest.mark.parametrize("cached", [False, True])
def test_distill_runs_on_every_family_with_a_frozen_teacher(family, cached, patches, tmp_path):
    torch.manual_seed(0)
    teacher = create_model(PRESET[family], 2, **TINY[family])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model(teacher.config)
    config = DistillConfig(iterations=3, teacher_cache=cached, validate_every=0, checkpoint_every=10)
    trained, result = run_distill(student, teacher, patches, None, config, tmp_path, torch.device("cpu"))
    assert result.iterations == 3 and len(result.loss_curve) == 1
    assert np.isfinite(result.loss_curve[0].total) and result.loss_curve[0].teacher > 0
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not trained.training


def test_cached_teacher_targets_match_per_patch_targets_inside(patches):
    """The fast loop's targets equal a per-patch teacher run away from the patch border."""
    from core.distill.stage import teacher_outputs

    torch.manual_seed(0)
    teacher = create_model("edsr_mini", 2, num_feat=8, num_block=1).eval()
    cache = teacher_outputs(teacher, patches, torch.device("cpu"))
    lr, _, cached = patches.batch(7, extra=cache)
    with torch.no_grad():
        direct = teacher(lr)
    border = 2 * 2 * 4  # receptive field radius (4 convs of 3x3 at LR... ) in HR pixels, generous
    inner = (slice(None), slice(None), slice(border, -border), slice(border, -border))
    # cached outputs are clamped to [0, 1] by the upscaler; compare where the direct output is in range
    direct_inner, cached_inner = direct[inner].clamp(0, 1), cached[inner]
    assert torch.allclose(direct_inner, cached_inner, atol=1e-4)


@pytest.mark.slow
def test_inherit_starts_the_student_from_the_teachers_weights(shared_weights, shared_data):
    from core.distill.inherit import evenly_spaced, inherit_weights
    from core.evaluate import evaluate_dataset
    from core.models.checkpoint import load_checkpoint

    teacher, _ = load_checkpoint(shared_weights / "RLFN_s_x2.pth", preset="rlfn_s", scale=2)
    set5 = shared_data / "benchmark" / "Set5"
    torch.manual_seed(0)
    scratch = create_model("rlfn_s", 2, channels=20, num_blocks=4, convs_per_block=1)
    scratch_psnr = evaluate_dataset(scratch, set5, 2).psnr
    inherited = create_model("rlfn_s", 2, channels=20, num_blocks=4, convs_per_block=1)
    counts = inherit_weights(inherited, teacher)
    assert counts["skipped"] == 0 and counts["blocks"] == 4
    assert evenly_spaced(6, 4) == [0, 2, 3, 5]
    # the last student block is the teacher's last block, sliced to the kept channels
    kept = torch.sort(torch.topk(teacher.conv_1.weight.abs().flatten(1).sum(1), 20).indices).values
    expected = teacher.block_6.c1_r.weight[kept][:, kept]
    assert torch.equal(inherited.block_4.c1_r.weight, expected)
    inherited_psnr = evaluate_dataset(inherited, set5, 2).psnr
    assert inherited_psnr > scratch_psnr + 10, (inherited_psnr, scratch_psnr)

    edsr_student = create_model("edsr_mini", 2)
    inherit_weights(edsr_student, create_model("edsr_baseline", 2))  # PixelShuffle groups line up


@pytest.mark.slow
def test_swinir_inherit_is_head_aware():
    """swinir_lightweight (60 dims, head_dim 10) -> swinir_mini (24 dims, head_dim 4), 6 heads each."""
    from core.distill.inherit import evenly_spaced, inherit_weights
    from core.errors import UserError

    torch.manual_seed(0)
    teacher, student = create_model("swinir_lightweight", 2), create_model("swinir_mini", 2)
    counts = inherit_weights(student, teacher)
    assert counts == {"copied": len(student.state_dict()), "skipped": 0, "channels": 24, "blocks": 3}
    assert evenly_spaced(4, 3) == [0, 2, 3]

    # Student RSTB 1, layer 0 comes from teacher RSTB 2, layer 0.
    channels = torch.sort(torch.topk(teacher.conv_first.weight.abs().flatten(1).sum(1), 24).indices).values
    t_attn = teacher.layers[2].residual_group.blocks[0].attn
    s_attn = student.layers[1].residual_group.blocks[0].attn
    qkv = t_attn.qkv.weight[:, channels]
    per_dim = qkv.abs().sum(1).view(3, 6, 10).sum(0)
    kept = torch.sort(torch.topk(per_dim, 4, dim=1).indices, dim=1).values
    for head in range(6):  # every head keeps 4 of its own 10 dims, the same ones in q, k and v
        rows = head * 10 + kept[head]
        for part in range(3):
            assert torch.equal(
                s_attn.qkv.weight[part * 24 + head * 4 : part * 24 + head * 4 + 4], qkv[part * 60 + rows]
            )
        assert torch.equal(
            s_attn.proj.weight[:, head * 4 : head * 4 + 4], t_attn.proj.weight[channels][:, rows]
        )
    assert torch.equal(s_attn.relative_position_bias_table, t_attn.relative_position_bias_table)

    # Inheriting from a model of the same architecture is the identity.
    same, copy = create_model("swinir_mini", 2).eval(), create_model("swinir_mini", 2).eval()
    inherit_weights(copy, same)
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(copy(x), same(x))
    with pytest.raises(UserError, match="window_size"):
        inherit_weights(create_model("swinir_mini", 2, window_size=4), teacher)
