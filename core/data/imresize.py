"""MATLAB-compatible bicubic `imresize` in numpy (method.md §6, shared/data/README.md).

MATLAB's `imresize(x, scale, 'bicubic')` is the resampler that made every benchmark LR image, and
PIL/OpenCV/torch bicubic differ from it by tenths of a dB. What it does, per axis:

- cubic kernel with a = -0.5;
- when shrinking (scale < 1) the kernel is stretched to width 4/scale and scaled by `scale`
  (antialiasing), weights normalised to sum to 1;
- output pixel x (1-based) samples input coordinate u = x/scale + 0.5·(1 - 1/scale);
- out-of-range taps are mirrored symmetrically, edge pixel included (..., 2, 1, 1, 2, ...);
- the height is resized first, then the width (for equal scales); output length ceil(in·scale);
- for uint8 input each 1-D pass rounds half away from zero and saturates to uint8, which is what
  reproduces the benchmark LR files bit for bit.

Each 1-D pass is a sparse (out, in) float64 matrix product that sums the taps in MATLAB's order, so
the cost is O(output size x taps) at any image size.
"""

import math

import numpy as np
from scipy import sparse

CUBIC_SUPPORT = 4.0  # taps of the unstretched kernel (|x| <= 2)


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def output_length(in_length: int, scale: float) -> int:
    """ceil(in·scale), robust to float error such as 171·(1/3) = 57.000000000000007."""
    return max(1, math.ceil(in_length * scale - 1e-9))


def contributions(
    in_length: int, out_length: int, scale: float, antialias: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB `contributions`: (weights, 0-based input indices), both (out_length, taps).

    Output pixel i is sum_k weights[i, k] * input[indices[i, k]].
    """
    shrink_with_antialias = scale < 1 and antialias
    kernel_width = CUBIC_SUPPORT / scale if shrink_with_antialias else CUBIC_SUPPORT

    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # 1-based input coordinate of each output pixel
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may be out of range

    distance = u[:, None] - indices
    if shrink_with_antialias:
        weights = scale * cubic(scale * distance)
    else:
        weights = cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)

    # Drop tap columns that are zero for every output pixel, as MATLAB does (saves work only).
    used = np.any(weights != 0, axis=0)
    weights, indices = weights[:, used], indices[:, used]

    # Symmetric mirror with the edge pixel repeated: index sequence 1..n, n..1, periodic with 2n.
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    return weights, mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]


def resize_matrix(in_length: int, out_length: int, scale: float, antialias: bool = True) -> np.ndarray:
    """The same resampling as a dense (out_length, in_length) matrix (for inspection and tests)."""
    weights, indices = contributions(in_length, out_length, scale, antialias)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], indices.shape)
    np.add.at(matrix, (rows, indices), weights)  # mirrored taps can hit the same pixel twice
    return matrix


def _resize_first_axis(x: np.ndarray, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Resample axis 0 of float64 `x` with a sparse (out, in) matrix, O(out·taps) at any size.

    The CSR rows keep the taps in order (mirrored duplicates unsummed), so each output is accumulated
    tap by tap in float64, as MATLAB does.
    """
    out_length, taps = weights.shape
    row_starts = np.arange(0, out_length * taps + 1, taps)
    matrix = sparse.csr_matrix((weights.ravel(), indices.ravel(), row_starts), shape=(out_length, x.shape[0]))
    flat = np.ascontiguousarray(x).reshape(x.shape[0], -1)
    return np.asarray(matrix @ flat).reshape(out_length, *x.shape[1:])


def _round_to_uint8(x: np.ndarray) -> np.ndarray:
    """Saturate, then round half away from zero: floor(x + 0.5) as x >= 0. Overwrites `x`."""
    np.clip(x, 0.0, 255.0, out=x)
    x += 0.5
    np.floor(x, out=x)
    return x.astype(np.uint8)


def imresize(
    img: np.ndarray,
    scale: float,
    output_shape: tuple[int, int] | None = None,
    antialias: bool = True,
) -> np.ndarray:
    """Resize HxW or HxWxC `img` by `scale` (e.g. 1/2 to shrink, 2 to enlarge) like MATLAB `imresize`.

    float input (any range; [0, 1] by convention) gives float64 output, unclipped (bicubic overshoots).
    uint8 input gives uint8 output, rounded and saturated after each 1-D pass as MATLAB does.
    `output_shape` (H, W) overrides ceil(in·scale); the kernel still uses `scale`.
    """
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects HxW or HxWxC, got shape {img.shape}")
    if scale <= 0:
        raise ValueError(f"imresize scale must be positive, got {scale}")
    is_uint8 = img.dtype == np.uint8
    if not is_uint8 and not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"imresize expects uint8 or float input, got {img.dtype}")

    in_h, in_w = img.shape[:2]
    out_h, out_w = output_shape or (output_length(in_h, scale), output_length(in_w, scale))
    # Height first.
    x = _resize_first_axis(img.astype(np.float64), *contributions(in_h, out_h, scale, antialias))
    if is_uint8:
        x = _round_to_uint8(x).astype(np.float64)
    # Then width, swapped to the front, resized, and swapped back (after rounding: a smaller copy).
    x = _resize_first_axis(np.swapaxes(x, 0, 1), *contributions(in_w, out_w, scale, antialias))
    if is_uint8:
        x = _round_to_uint8(x)
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))


def mod_crop(img: np.ndarray, multiple: int) -> np.ndarray:
    """Crop the bottom/right so that H and W are multiples of `multiple` (what made the benchmark LR)."""
    h, w = img.shape[:2]
    return img[: h - h % multiple, : w - w % multiple]


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """The benchmark LR of `hr` at integer `scale`: imresize(mod_crop(hr, scale), 1/scale)."""
    return imresize(mod_crop(hr, scale), 1.0 / scale)
