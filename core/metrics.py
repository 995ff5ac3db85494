"""Y-channel PSNR and SSIM exactly as BasicSR `test_y_channel=True` computes them (method.md §6).

1. SR float output -> clamp [0, 1] -> x255 -> round -> uint8 (`quantize`); ground truth is uint8.
2. `crop_border` (= scale) pixels are removed from every side of both images.
3. Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with R, G, B in [0, 255] (BT.601 studio swing,
   MATLAB `rgb2ycbcr`), in float and not rounded.
4. PSNR in float64; the caller reports the mean of per-image values.
5. SSIM: 11x11 Gaussian window (sigma 1.5), C1 = (0.01·255)², C2 = (0.03·255)², mean over the valid
   region; scikit-image's `structural_similarity` with the arguments below computes exactly that.
"""

import numpy as np
from skimage.metrics import structural_similarity

Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0
Y_OFFSET = 16.0
DATA_RANGE = 255.0


def quantize(sr: np.ndarray) -> np.ndarray:
    """Float SR output in [0, 1] (any float dtype) -> uint8, clamped and rounded (half to even, as torch)."""
    return np.round(np.clip(np.asarray(sr, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """HxWx3 RGB in [0, 255] (uint8 or float) -> HxW float64 Y in [16, 235]; HxW input is returned as is."""
    x = np.asarray(img, dtype=np.float64)
    if x.ndim == 2:
        return x
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects HxW or HxWx3, got shape {x.shape}")
    return x @ Y_WEIGHTS + Y_OFFSET


def _cropped_y_pair(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    if sr.shape != hr.shape:
        raise ValueError(f"SR {sr.shape} and HR {hr.shape} shapes differ")
    if sr.dtype != np.uint8 or hr.dtype != np.uint8:
        raise ValueError(f"metrics take uint8 images (quantize the SR first), got {sr.dtype}/{hr.dtype}")
    h, w = sr.shape[:2]
    if crop_border < 0 or 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")
    window = (slice(crop_border, h - crop_border), slice(crop_border, w - crop_border))
    return rgb_to_y(sr)[window], rgb_to_y(hr)[window]


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """PSNR (dB) on Y between two uint8 RGB images after cropping `crop_border` px; inf when identical."""
    sr_y, hr_y = _cropped_y_pair(sr, hr, crop_border)
    mse = float(np.mean((sr_y - hr_y) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(DATA_RANGE**2 / mse))


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """SSIM on Y (Wang et al. 2004, BasicSR `calculate_ssim`) between two uint8 RGB images."""
    sr_y, hr_y = _cropped_y_pair(sr, hr, crop_border)
    if min(sr_y.shape) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {sr_y.shape}")
    return float(
        structural_similarity(
            sr_y,
            hr_y,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=DATA_RANGE,
        )
    )
