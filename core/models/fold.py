"""Sub-pixel folding: run `conv_last(PixelShuffle(r)(y))` as `PixelShuffle(r)(conv'(y))` (inference only).

EDSR and classical SwinIR end with `upsample` (… conv C→r²C, PixelShuffle(r)) and a 3×3 `conv_last` on
the HR image. Measured here, the HR-side part is what keeps narrow models from their conv speed: for
edsr_mini ×2 ONNX Runtime spends a fifth of its time moving the 16-channel HR map through DepthToSpace
and layout reorders, while the body's convs run near the matmul peak.

A 3×3 conv after PixelShuffle(r) is itself a 3×3 conv on the LR side (r ≥ 2), with r²·C inputs and
r²·O outputs, followed by PixelShuffle(r) of only O·r² channels: HR output pixel (r·i + a, r·j + b)
reads HR rows r·i + a + dy − 1, i.e. LR row i + ⌊(a + dy − 1)/r⌋ (an offset in −1..1) and sub-pixel
row (a + dy − 1) mod r. The HR zero padding lands exactly on the LR zero padding, so the result is
the same function (equal to float64 rounding, tests/test_fold.py), computed with more multiply-adds
(r² times conv_last's: most taps of the folded kernel are zero) but no wide HR tensor.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def subpixel_conv(conv: nn.Conv2d, r: int) -> nn.Conv2d:
    """The LR-side conv' with conv(PixelShuffle(r)(y)) == PixelShuffle(r)(conv'(y)), for a 3×3 conv."""
    if not (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    ):
        raise ValueError(f"subpixel_conv folds a 3x3, stride 1, padding 1 conv, got {conv}")
    if r < 2:
        raise ValueError(f"subpixel_conv needs a shuffle factor >= 2, got {r}")
    weight = conv.weight.detach()
    out_channels, in_channels = weight.shape[:2]
    # [o, a, b, c, a', b', ey, ex]: output phase (a, b), input phase (a', b'), LR tap (ey, ex).
    folded = weight.new_zeros(out_channels, r, r, in_channels, r, r, 3, 3)
    for a in range(r):
        for dy in range(3):
            ey, a_in = divmod(a + dy - 1, r)
            for b in range(r):
                for dx in range(3):
                    ex, b_in = divmod(b + dx - 1, r)
                    folded[:, a, b, :, a_in, b_in, ey + 1, ex + 1] += weight[:, :, dy, dx]
    lr_conv = nn.Conv2d(in_channels * r * r, out_channels * r * r, 3, padding=1, bias=conv.bias is not None)
    lr_conv = lr_conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lr_conv.weight.copy_(folded.reshape(out_channels * r * r, in_channels * r * r, 3, 3))
        if conv.bias is not None:
            # PixelShuffle's channel order is o·r² + a·r + b: every phase of output o gets o's bias.
            lr_conv.bias.copy_(conv.bias.detach().repeat_interleave(r * r))
    return lr_conv


def has_foldable_tail(model: nn.Module) -> bool:
    """EDSR, and SwinIR with the classical 'pixelshuffle' upsampler: conv_last(upsample(x)) at the end."""
    config = getattr(model, "config", None)
    family = getattr(config, "family", None)
    if family not in ("edsr", "swinir") or getattr(config, "upsampler", "pixelshuffle") != "pixelshuffle":
        return False
    upsample = getattr(model, "upsample", None)
    return (
        isinstance(upsample, nn.Sequential)
        and isinstance(upsample[-1], nn.PixelShuffle)
        and isinstance(getattr(model, "conv_last", None), nn.Conv2d)
    )


def with_folded_tail(model: nn.Module) -> nn.Module:
    """A copy of `model` whose last PixelShuffle + conv_last run as conv' + PixelShuffle (same outputs);
    the model itself when it has no such tail (RLFN and lightweight SwinIR end with conv + shuffle)."""
    if not has_foldable_tail(model):
        return model
    folded = copy.deepcopy(model)
    *head, shuffle = folded.upsample
    r = shuffle.upscale_factor
    folded.upsample = nn.Sequential(*head, subpixel_conv(folded.conv_last, r), nn.PixelShuffle(r))
    folded.conv_last = nn.Identity()
    return folded
