"""Upscaling as callers use it: an RGB array (`upscale_array`) or an image file or bytes (`upscale_file`),
with any backend name, 'auto' or a prepared runner."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch import nn

from core.errors import UserError
from core.infer.runners import Runner, model_scale
from core.infer.tiling import ProgressFn, resolve_tile, upscale_padded, validate_rgb
from core.infer.tuning import prepare_backend

log = logging.getLogger(__name__)


def upscale_array(
    model: nn.Module,
    rgb: np.ndarray,
    *,
    tile: int | str | None = None,
    overlap: int = 32,
    backend: str | Runner | None = None,
    on_progress: ProgressFn | None = None,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """Upscale float32 RGB HxWx3 in [0, 1] to (sH)x(sW)x3 float32, clamped to [0, 1].

    tile: LR tile side (rounded down to a multiple of 8), or None/'auto' to size it from free memory
    (the whole image when it fits); an out-of-memory error retries at half the size down to 32.
    overlap: LR pixels shared by neighbouring tiles (at most half a tile). backend: a name from BACKENDS,
    'auto' (`choose_backend`), a runner from `prepare_backend`, or None for 'eager'.
    on_progress(i, n) is called after each tile ("tile i/n"); a retry restarts the count.
    """
    rgb = validate_rgb(rgb)
    if overlap < 0:
        raise UserError(f"overlap must be >= 0, got {overlap}")
    requested_tile = resolve_tile(tile)  # a bad tile fails before the (possibly slow) backend choice
    runner = (
        prepare_backend(model, backend, cache_dir) if backend is None or isinstance(backend, str) else backend
    )
    return upscale_padded(model, runner, rgb, requested_tile, overlap, on_progress)


# ------------------------------------------------------------------------------------------ files


def _format_for(destination: str | Path | None, fmt: str | None, input_format: str) -> str:
    from core.data.images import normalise_format

    if fmt is not None:
        return normalise_format(fmt, input_format)
    if destination is not None and Path(destination).suffix:
        suffix = Path(destination).suffix.lower().lstrip(".")
        if suffix not in ("png", "jpg", "jpeg", "webp"):
            raise UserError(f"cannot write .{suffix}; use a .png, .jpg or .webp output (or pass fmt)")
        return normalise_format(suffix)
    return normalise_format("auto", input_format)


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upscale of an HxW alpha plane in [0, 1] (never the model, never bilinear; upscayl#881)."""
    import cv2

    height, width = alpha.shape
    resized = cv2.resize(
        alpha.astype(np.float32), (width * scale, height * scale), interpolation=cv2.INTER_CUBIC
    )
    return np.clip(resized, 0.0, 1.0)


def upscale_file(
    model: nn.Module,
    source: str | Path | bytes,
    destination: str | Path | None = None,
    *,
    tile: int | str | None = None,
    backend: str | Runner | None = None,
    fmt: str | None = None,
    on_progress: ProgressFn | None = None,
    overlap: int = 32,
    max_pixels: int | None = None,
    cache_dir: str | Path | None = None,
) -> bytes | Path:
    """Decode -> upscale -> encode. Returns the encoded bytes, or writes `destination` and returns it.

    Decoding applies the EXIF orientation and keeps 8/16-bit depth, gray and alpha; the output keeps the
    bit depth (16-bit only in PNG), gray stays gray (mean of the model's three channels), alpha is
    upscaled bicubically on its own and recombined, ICC/EXIF are kept with orientation 1. The format is
    `fmt` ('auto', 'png', 'jpg', 'webp'), else the destination's extension, else the input's format.
    """
    from core.data.images import DEFAULT_MAX_PIXELS, encode_image, read_image

    image = read_image(source, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    output_format = _format_for(destination, fmt, image.format)
    scale = model_scale(model)
    sr = upscale_array(
        model,
        image.rgb,
        tile=tile,
        overlap=overlap,
        backend=backend,
        on_progress=on_progress,
        cache_dir=cache_dir,
    )
    alpha = upscale_alpha(image.alpha, scale) if image.alpha is not None else None
    encoded = encode_image(
        sr,
        output_format,
        alpha=alpha,
        mode=image.mode,
        bit_depth=image.bit_depth,
        icc_profile=image.icc_profile,
        exif=image.exif,
    )
    if destination is None:
        return encoded
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(encoded)
    return destination
