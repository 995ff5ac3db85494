"""Y-PSNR / Y-SSIM conventions (method.md §6) and SSIM against a direct BasicSR transcription."""

import cv2
import numpy as np
import pytest

from core.data.datasets import bicubic_upscale
from core.data.images import load_rgb_uint8
from core.metrics import psnr_y, quantize, rgb_to_y, ssim_y


def basicsr_ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """BasicSR `calculate_ssim(test_y_channel=True)`: 11x11 Gaussian (sigma 1.5), valid region, mean."""
    sr = sr[crop_border:-crop_border, crop_border:-crop_border].astype(np.float64)
    hr = hr[crop_border:-crop_border, crop_border:-crop_border].astype(np.float64)
    weights = np.array([65.481, 128.553, 24.966]) / 255.0
    img1, img2 = sr @ weights + 16.0, hr @ weights + 16.0
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img1, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = cv2.filter2D(img1**2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(img2**2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img1 * img2, -1, window)[5:-5, 5:-5] - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return float(ssim_map.mean())


def test_rgb_to_y_is_bt601_studio_swing_unrounded():
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 20, 30]]], dtype=np.uint8)
    y = rgb_to_y(pixels)
    np.testing.assert_allclose(y[0, :3], [16.0, 235.0, 16.0 + 65.481], atol=1e-9)
    assert y[0, 3] == pytest.approx(16 + (65.481 * 10 + 128.553 * 20 + 24.966 * 30) / 255, abs=1e-12)
    assert y.dtype == np.float64 and y[0, 3] != round(y[0, 3])
    gray = np.full((2, 2), 7.0)
    np.testing.assert_array_equal(rgb_to_y(gray), gray)  # HxW passes through


def test_quantize_clamps_scales_and_rounds():
    sr = np.array([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 100.4 / 255, 1.0, 1.3], dtype=np.float32)
    np.testing.assert_array_equal(quantize(sr), [0, 0, 0, 1, 100, 255, 255])
    assert quantize(sr).dtype == np.uint8


def test_psnr_known_value_border_crop_and_identity():
    hr = np.full((20, 20, 3), 100, dtype=np.uint8)
    sr = hr + np.uint8(1)  # every channel +1 -> Y differs by 219/255 everywhere
    expected = 20 * np.log10(255 / (219 / 255))
    assert psnr_y(sr, hr, crop_border=2) == pytest.approx(expected, abs=1e-10)
    sr_border = sr.copy()
    sr_border[:2] = 255  # only inside the cropped border
    assert psnr_y(sr_border, hr, crop_border=2) == pytest.approx(expected, abs=1e-10)
    assert psnr_y(sr_border, hr, crop_border=1) < expected - 1
    assert psnr_y(hr, hr, crop_border=2) == float("inf")


def test_metrics_reject_float_or_mismatched_input():
    hr = np.zeros((20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        psnr_y(hr.astype(np.float32), hr, 2)
    with pytest.raises(ValueError, match="shapes"):
        ssim_y(hr[:-1], hr, 2)
    with pytest.raises(ValueError):
        psnr_y(hr, hr, 10)


def test_ssim_identical_is_one_and_random_matches_basicsr():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, size=(40, 37, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-20, 21, size=hr.shape), 0, 255).astype(np.uint8)
    assert ssim_y(hr, hr, 2) == pytest.approx(1.0, abs=1e-12)
    assert ssim_y(sr, hr, 2) == pytest.approx(basicsr_ssim_y(sr, hr, 2), abs=1e-6)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["baby", "butterfly", "head"])
def test_ssim_equals_basicsr_reference_on_bicubic_output(shared_data, name):
    root = shared_data / "benchmark" / "Set5"
    hr = load_rgb_uint8(root / "HR" / f"{name}.png")
    lr = load_rgb_uint8(root / "LR_bicubic" / "X2" / f"{name}x2.png")
    sr = quantize(bicubic_upscale(lr, 2))
    gt = hr[: sr.shape[0], : sr.shape[1]]
    ours, reference = ssim_y(sr, gt, 2), basicsr_ssim_y(sr, gt, 2)
    print(f"{name}: SSIM ours {ours:.8f}  BasicSR transcription {reference:.8f}")
    assert ours == pytest.approx(reference, abs=1e-6)
    assert 0.8 < ours < 1.0
