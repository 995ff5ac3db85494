"""Reading hyper-parameters from a state_dict's keys and shapes: what the per-family detectors share."""

from __future__ import annotations

import math

from torch import Tensor

from core.errors import CheckpointError
from core.models.config import SCALES


def count_indexed(sd: dict[str, Tensor], template: str, start: int = 0) -> int:
    """How many consecutive indices i >= start have template.format(i) in sd."""
    i = start
    while template.format(i) in sd:
        i += 1
    return i - start


def scale_from_pixelshuffle_conv(out_channels: int, what: str) -> int:
    scale = math.isqrt(out_channels // 3)
    if 3 * scale * scale != out_channels or scale not in SCALES:
        raise CheckpointError(f"{what} has {out_channels} output channels: not 3·s² for a scale in {SCALES}")
    return scale


def scale_from_upsample(sd: dict[str, Tensor], num_feat: int) -> int:
    """Scale of a BasicSR Upsample (conv C->4C per x2 stage, or C->9C for x3)."""
    out = sd["upsample.0.weight"].shape[0]
    if out == 9 * num_feat:
        return 3
    if out == 4 * num_feat:
        return 4 if "upsample.2.weight" in sd else 2
    raise CheckpointError(f"upsample.0 has {out} output channels; expected 4·{num_feat} or 9·{num_feat}")
