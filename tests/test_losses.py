"""core.losses against the float64 reference values of method.md §5.2 and independent re-derivations."""

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from core.losses import (
    charbonnier_loss,
    distill_loss_parts,
    distillation_loss,
    gaussian_blur5,
    high_frequency,
    kd_loss,
    kd_loss_parts,
    laplacian_level_means,
    laplacian_loss,
    laplacian_pyramid,
)

# method.md §5.2
REF_LEVEL_MEANS = [0.3282670637, 0.2152023253, 0.05258147841, 0.007230961095, 0.004049407848]
REF_LAP = 1.0916358422
REF_LAP_HF = 0.4052718187
REF_DIS = 1.4969076609
REF_L1 = 0.4052649678
REF_CHARBONNIER = 0.4052741974
REF_KD_TOTAL = 1.5374341577
REF_LAP_SUM = 11063.391536


def reference_inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """x = 0.5 + 0.5·sin(0.37k), y = 0.5 + 0.5·cos(0.11k), k the C-order flat index over (2,3,64,64)."""
    k = torch.arange(2 * 3 * 64 * 64, dtype=torch.float64).reshape(2, 3, 64, 64)
    x = 0.5 + 0.5 * torch.sin(0.37 * k)
    y = 0.5 + 0.5 * torch.cos(0.11 * k)
    return x.to(dtype), y.to(dtype)


def test_reference_values_float64() -> None:
    x, y = reference_inputs()
    level_means = [float(m) for m in laplacian_level_means(x, y)]
    print("per-level means", level_means)
    assert level_means == pytest.approx(REF_LEVEL_MEANS, abs=1e-9)
    assert float(laplacian_loss(x, y)) == pytest.approx(REF_LAP, abs=1e-9)
    assert float(laplacian_loss(high_frequency(x), high_frequency(y))) == pytest.approx(REF_LAP_HF, abs=1e-9)
    assert float(distillation_loss(x, y)) == pytest.approx(REF_DIS, abs=1e-9)
    assert float(F.l1_loss(x, y)) == pytest.approx(REF_L1, abs=1e-9)
    assert float(charbonnier_loss(x, y)) == pytest.approx(REF_CHARBONNIER, abs=1e-9)
    # y as both teacher and ground truth, x as the student.
    assert float(kd_loss(x, y, y, alpha=0.1)) == pytest.approx(REF_KD_TOTAL, abs=1e-9)


def test_sum_reduction_variant_is_the_inflated_st_mfnet_figure() -> None:
    x, y = reference_inputs()
    summed = sum(
        (2.0**i) * float((px - py).abs().sum())
        for i, (px, py) in enumerate(zip(laplacian_pyramid(x), laplacian_pyramid(y), strict=True))
    )
    print("sum-reduction L_Lap", summed)
    assert summed == pytest.approx(REF_LAP_SUM, abs=1e-6)
    assert summed / float(laplacian_loss(x, y)) > 1e4  # why the project uses means


def test_kd_parts_add_up_and_alpha_weights_l1_only() -> None:
    x, y = reference_inputs()
    gt = 0.5 + 0.25 * torch.cos(0.05 * torch.arange(x.numel(), dtype=torch.float64)).reshape(x.shape)
    parts = kd_loss_parts(x, y, gt, alpha=0.3)
    assert float(parts.l1) == pytest.approx(float((x - gt).abs().mean()), abs=1e-12)
    assert float(parts.teacher) == pytest.approx(REF_LAP, abs=1e-9)
    assert float(parts.teacher_hf) == pytest.approx(REF_LAP_HF, abs=1e-9)
    assert float(parts.total) == pytest.approx(0.3 * float(parts.l1) + REF_DIS, abs=1e-9)
    assert set(parts.as_floats()) == {"total", "l1", "teacher", "teacher_hf"}


def test_ground_truth_losses_need_no_teacher() -> None:
    x, gt = reference_inputs()
    l2 = distill_loss_parts("l2_gt", x, None, gt)
    assert float(l2.total) == pytest.approx(float(((x - gt) ** 2).mean()), abs=1e-12)
    assert float(l2.l1) == pytest.approx(float(distill_loss_parts("l1_gt", x, None, gt).total), abs=1e-12)
    with pytest.raises(ValueError, match="needs the teacher"):
        distill_loss_parts("pixel_hf", x, None, gt)


def test_float32_matches_float64_references() -> None:
    x, y = reference_inputs(torch.float32)
    assert laplacian_loss(x, y).dtype == torch.float32
    assert float(laplacian_loss(x, y)) == pytest.approx(REF_LAP, rel=1e-5)
    assert float(distillation_loss(x, y)) == pytest.approx(REF_DIS, rel=1e-5)
    assert float(charbonnier_loss(x, y)) == pytest.approx(REF_CHARBONNIER, rel=1e-5)
    assert float(kd_loss(x, y, y)) == pytest.approx(REF_KD_TOTAL, rel=1e-5)


def test_blur_is_the_binomial_kernel_with_mirror_padding() -> None:
    # scipy's 'mirror' mode = torch's 'reflect' (the edge pixel is not repeated).
    rng = np.random.default_rng(0)
    image = rng.random((2, 3, 12, 20))
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = np.outer(taps, taps) / 256.0
    expected = np.stack(
        [np.stack([scipy.ndimage.correlate(ch, kernel, mode="mirror") for ch in img]) for img in image]
    )
    blurred = gaussian_blur5(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(blurred, expected, atol=1e-14)
    # and not numpy 'symmetric' / scipy 'reflect', which repeat the edge pixel
    wrong = scipy.ndimage.correlate(image[0, 0], kernel, mode="reflect")
    assert np.abs(wrong - blurred[0, 0]).max() > 1e-3


def test_blur_keeps_constants_and_high_frequency_is_the_residual() -> None:
    constant = torch.full((1, 3, 16, 16), 0.7, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur5(constant), constant, atol=1e-15, rtol=0)
    assert float(high_frequency(constant).abs().max()) < 1e-15
    x, _ = reference_inputs()
    torch.testing.assert_close(high_frequency(x), x - gaussian_blur5(x), atol=0, rtol=0)


def test_pyramid_shapes_and_exact_reconstruction() -> None:
    x, _ = reference_inputs()
    pyramid = laplacian_pyramid(x)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    # Collapse: cur = band + up(low) going back up reproduces x (the bands are cur − up(down)).
    current = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        holes = current.new_zeros(*current.shape[:2], current.shape[2] * 2, current.shape[3] * 2)
        holes[:, :, ::2, ::2] = current
        current = band + 4.0 * gaussian_blur5(holes)
    torch.testing.assert_close(current, x, atol=1e-12, rtol=0)
    # The low-pass level is the blurred 2×2 average pool applied 4 times.
    low = x
    for _ in range(4):
        low = F.avg_pool2d(gaussian_blur5(low), 2)
    torch.testing.assert_close(pyramid[-1], low, atol=1e-14, rtol=0)  # blur·pool as one matrix: rounding


def test_sizes_not_divisible_by_16_are_rejected() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        laplacian_pyramid(torch.zeros(1, 3, 48, 40))
    with pytest.raises(ValueError, match="divisible by 16"):
        laplacian_loss(torch.zeros(1, 3, 50, 48), torch.zeros(1, 3, 50, 48))
    with pytest.raises(ValueError, match=">= 32"):
        laplacian_pyramid(torch.zeros(1, 3, 16, 32))  # the 2×4 coarsest blur cannot reflect-pad 2
    assert len(laplacian_pyramid(torch.zeros(1, 3, 12, 20), levels=3)) == 3  # 4 divides both


def test_charbonnier_eps_is_squared_under_the_root() -> None:
    x = torch.zeros(4, dtype=torch.float64)
    assert float(charbonnier_loss(x, x)) == pytest.approx(1e-3, abs=1e-15)
    assert float(charbonnier_loss(x, x, eps=0.5)) == pytest.approx(0.5, abs=1e-15)
    assert float(charbonnier_loss(x + 0.3, x)) == pytest.approx(np.sqrt(0.09 + 1e-6), abs=1e-15)


@pytest.mark.slow
def test_gradients_flow_to_the_student_only() -> None:
    x, y = reference_inputs(torch.float32)
    student = x.clone().requires_grad_(True)
    teacher = y.clone()
    parts = kd_loss_parts(student, teacher, y)
    parts.total.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert float(student.grad.abs().sum()) > 0
    assert teacher.grad is None
    # Charbonnier is differentiable at x == y (that is what eps is for).
    same = y.clone().requires_grad_(True)
    charbonnier_loss(same, y).backward()
    assert torch.isfinite(same.grad).all() and float(same.grad.abs().max()) == 0.0
    # Float64 gradcheck of the full distillation loss on a small patch.
    small = (torch.rand(1, 3, 32, 32, dtype=torch.float64) * 0.5).requires_grad_(True)
    target = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: kd_loss(s, target, target), (small,), eps=1e-7, atol=1e-5, fast_mode=True
    )


def test_one_pyramid_of_the_difference_equals_two_pyramids() -> None:
    """The loss uses P(x − y) and HF(x − y); the paper's form subtracts two pyramids. Same numbers."""
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 64, 48, dtype=torch.float64), torch.rand(2, 3, 64, 48, dtype=torch.float64)
    two_pyramids = sum(
        (2.0**i) * (px - py).abs().mean()
        for i, (px, py) in enumerate(zip(laplacian_pyramid(x), laplacian_pyramid(y), strict=True))
    )
    hf_pyramids = sum(
        (2.0**i) * (px - py).abs().mean()
        for i, (px, py) in enumerate(
            zip(laplacian_pyramid(high_frequency(x)), laplacian_pyramid(high_frequency(y)), strict=True)
        )
    )
    parts = kd_loss_parts(x, y, y)
    assert float(parts.teacher) == pytest.approx(float(two_pyramids), abs=1e-12)
    assert float(parts.teacher_hf) == pytest.approx(float(hf_pyramids), abs=1e-12)
