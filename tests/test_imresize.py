"""MATLAB-compatible bicubic imresize: bit-exact on every shared benchmark LR file; exact on known cases."""

import math

import numpy as np
import pytest

from core.data.images import load_rgb_uint8
from core.data.imresize import cubic, downscale, imresize, mod_crop, output_length, resize_matrix

SETS = ("Set5", "Set14", "B100")


def reference_resize_axis(x: np.ndarray, scale: float, out_length: int) -> np.ndarray:
    """Per-pixel transcription of MATLAB's imresize `contributions` + `resizeAlongDim` along axis 0."""
    in_length = x.shape[0]
    width = 4.0 / scale if scale < 1 else 4.0
    out = np.zeros((out_length,) + x.shape[1:])
    for i in range(1, out_length + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + k for k in range(math.ceil(width) + 2)]
        weights = np.array(
            [
                (scale * cubic(np.array(scale * (u - j))) if scale < 1 else cubic(np.array(u - j)))
                for j in taps
            ]
        )
        weights = weights / weights.sum()
        for j, w in zip(taps, weights, strict=True):
            # symmetric padding, edge included: 0 -> 1, -1 -> 2, n+1 -> n, ...
            k = j
            while k < 1 or k > in_length:
                k = 1 - k if k < 1 else 2 * in_length + 1 - k
            out[i - 1] += w * x[k - 1]
    return out


def reference_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    out = reference_resize_axis(img.astype(np.float64), scale, output_length(h, scale))
    out = np.swapaxes(reference_resize_axis(np.swapaxes(out, 0, 1), scale, output_length(w, scale)), 0, 1)
    return out


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("benchmark_set", SETS)
def test_reproduces_every_benchmark_lr_file_bit_for_bit(shared_data, benchmark_set):
    root = shared_data / "benchmark" / benchmark_set
    hr_paths = sorted((root / "HR").glob("*.png"))
    assert hr_paths, f"no HR images in {root}"
    checked = 0
    for hr_path in hr_paths:
        hr = load_rgb_uint8(hr_path)
        for scale in (2, 3, 4):
            lr_file = load_rgb_uint8(root / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png")
            made = downscale(hr, scale)
            assert made.dtype == np.uint8
            assert made.shape == lr_file.shape, (hr_path.name, scale)
            mismatches = int(np.count_nonzero(made != lr_file))
            assert mismatches == 0, f"{hr_path.name} x{scale}: {mismatches} pixels differ"
            checked += 1
    print(f"{benchmark_set}: {checked} LR files reproduced bit for bit")
    assert checked == 3 * len(hr_paths)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 0.37, 2.0, 3.0, 1.7])
def test_matches_per_pixel_matlab_transcription(scale):
    rng = np.random.default_rng(0)
    img = rng.random((23, 17, 3))
    ours = imresize(img, scale)
    ref = reference_imresize(img, scale)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_linear_ramp_is_sampled_at_matlab_coordinates():
    # Cubic convolution reproduces linear functions, so away from the borders the output of a ramp
    # f(j) = j (1-based) is exactly the source coordinate u = x/scale + 0.5(1 - 1/scale).
    ramp = np.arange(1, 41, dtype=np.float64)[:, None] * np.ones((1, 3))
    up = imresize(ramp, 2.0)[:, 0]
    x = np.arange(1, 81)
    np.testing.assert_allclose(up[4:-4], (x / 2 + 0.25)[4:-4], atol=1e-12)
    down = imresize(ramp, 0.5)[:, 0]
    x = np.arange(1, 21)
    np.testing.assert_allclose(down[2:-2], (2 * x - 0.5)[2:-2], atol=1e-12)


def test_output_size_is_ceil_of_scaled_size_and_robust_to_float_error():
    assert imresize(np.zeros((171, 5)), 1 / 3).shape == (57, 2)
    assert imresize(np.zeros((5, 7, 3)), 0.5).shape == (3, 4, 3)
    assert imresize(np.zeros((10, 10)), 1 / 3).shape == (4, 4)
    assert imresize(np.zeros((4, 6)), 2.0).shape == (8, 12)
    assert imresize(np.zeros((4, 6)), 0.5, output_shape=(3, 2)).shape == (3, 2)


def test_constant_image_stays_constant_and_rows_sum_to_one():
    for scale in (0.25, 1 / 3, 0.5, 2.0, 3.0):
        out = imresize(np.full((13, 11, 3), 0.7), scale)
        np.testing.assert_allclose(out, 0.7, atol=1e-12)
        np.testing.assert_allclose(resize_matrix(13, output_length(13, scale), scale).sum(1), 1.0, atol=1e-12)


def test_uint8_path_rounds_and_saturates_and_2d_equals_each_channel():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(30, 26, 3), dtype=np.uint8)
    img[:8, :8] = 255  # overshoot above 255 next to a dark edge
    img[8:12, :8] = 0
    out = imresize(img, 0.5)
    assert out.dtype == np.uint8
    per_channel = np.stack([imresize(img[..., c], 0.5) for c in range(3)], axis=2)
    np.testing.assert_array_equal(out, per_channel)

    # Same as the per-pixel transcription with round-half-up + saturation after each 1-D pass.
    def round_sat(x):
        return np.floor(np.clip(x, 0, 255) + 0.5)

    first = round_sat(reference_resize_axis(img.astype(np.float64), 0.5, 15))
    second = round_sat(np.swapaxes(reference_resize_axis(np.swapaxes(first, 0, 1), 0.5, 13), 0, 1))
    np.testing.assert_array_equal(out, second)
    assert imresize(img.astype(np.float64), 0.5).max() > 255  # the float path overshoots; uint8 saturates


def test_mod_crop_and_downscale_shapes():
    img = np.zeros((481, 321, 3), dtype=np.uint8)
    assert mod_crop(img, 4).shape == (480, 320, 3)
    assert downscale(img, 3).shape == (160, 107, 3)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        imresize(np.zeros((2, 2, 2, 2)), 0.5)
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4), dtype=np.int32), 0.5)
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4)), 0)
