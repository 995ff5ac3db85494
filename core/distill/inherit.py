"""Experimental `student_init = inherit`: start the student from the pruned teacher's surviving weights.

method.md §5.4: keep N̂_b evenly spaced blocks, the first N̂_l layers of each, and the N̂_c feature
channels with the largest L1 norm. The paper's students start from scratch; figures from an inherited
start are not comparable with its Table I.

Implemented for the convolutional families (EDSR, RLFN), where a student tensor is a slice of the
teacher tensor of the same name (block indices remapped): along each dimension the student keeps
- everything, when the sizes agree (RGB in/out, ESA's inner width, the upsampler's 3s² outputs);
- the selected feature channels, when the dimension is the feature width (or a PixelShuffle multiple
  of it: EDSR's upsample conv emits k = r² channels per feature channel, in (c, r, r) order).
SwinIR would need head-aware selection (qkv rows per head); it is refused with a clear message.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from core.errors import UserError

# The top-level conv whose output filters rank the feature channels, per family.
FIRST_CONV = {"edsr": "conv_first.weight", "rlfn": "conv_1.weight"}
# How a block's index appears in a parameter name, per family.
BLOCK_NAME = {"edsr": re.compile(r"^body\.(\d+)\."), "rlfn": re.compile(r"^block_(\d+)\.")}
BLOCK_BASE = {"edsr": 0, "rlfn": 1}  # EDSR counts blocks from 0, RLFN from 1


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """n_student indices spread over range(n_teacher), first and last included."""
    return [int(round(x)) for x in np.linspace(0, n_teacher - 1, n_student)]


def _slice_dim(tensor: torch.Tensor, dim: int, size: int, channels: torch.Tensor, width: int) -> torch.Tensor:
    full = tensor.shape[dim]
    if full == size:
        return tensor
    if full % width == 0 and size % len(channels) == 0 and full // width == size // len(channels):
        per = full // width  # channels per feature channel (1, or r² before a PixelShuffle)
        index = (channels[:, None] * per + torch.arange(per)).flatten()
        return tensor.index_select(dim, index)
    if size < full:  # an inner width that shrank with the features (ESA's f = min(16, N̂_c)): the first ones
        return tensor.narrow(dim, 0, size)
    raise UserError(f"cannot inherit a {tuple(tensor.shape)} tensor into size {size} along dim {dim}")


@torch.no_grad()
def inherit_weights(student: nn.Module, pruned: nn.Module) -> dict[str, int]:
    """Copy slices of `pruned`'s weights into `student` in place; returns counts of what was copied."""
    family = student.config.family
    if family not in FIRST_CONV:
        raise UserError(f"student_init=inherit is implemented for EDSR and RLFN, not {family}")
    teacher_state = pruned.state_dict()
    t_nc, _, t_nb = pruned.config.triple
    s_nc, _, s_nb = student.config.triple
    ranking = teacher_state[FIRST_CONV[family]].abs().flatten(1).sum(1)
    channels = torch.sort(torch.topk(ranking, s_nc).indices).values
    base = BLOCK_BASE[family]
    block_map = {base + i: base + t for i, t in enumerate(evenly_spaced(t_nb, s_nb))}
    copied = skipped = 0
    for name, target in student.state_dict().items():
        source_name = BLOCK_NAME[family].sub(
            lambda m: m.group(0).replace(m.group(1), str(block_map[int(m.group(1))])), name, count=1
        )
        source = teacher_state.get(source_name)
        if source is None or source.dim() != target.dim():
            skipped += 1
            continue
        for dim in range(source.dim()):
            source = _slice_dim(source, dim, target.shape[dim], channels, t_nc)
        target.copy_(source)
        copied += 1
    return {"copied": copied, "skipped": skipped, "channels": s_nc, "blocks": s_nb}
