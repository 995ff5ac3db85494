"""Experimental `student_init = inherit`: start the student from the pruned teacher's surviving weights.

method.md §5.4: keep N̂_b evenly spaced blocks, the first N̂_l layers of each, and the N̂_c feature
channels with the largest L1 norm. The paper's students start from scratch; figures from an inherited
start are not comparable with its Table I.

Implemented for the convolutional families (EDSR, RLFN), where a student tensor is a slice of the
teacher tensor of the same name (block indices remapped): along each dimension the student keeps
- everything, when the sizes agree (RGB in/out, ESA's inner width, the upsampler's 3s² outputs);
- the selected feature channels, when the dimension is the feature width (or a PixelShuffle multiple
  of it: EDSR's upsample conv emits k = r² channels per feature channel, in (c, r, r) order).
For SwinIR (same heads, window and upsampler as the teacher) the selection is head-aware: RSTBs evenly
spaced, the first N̂_l Swin layers of each, the top-L1 feature channels of conv_first everywhere a
dimension is the embedding; in each layer, per head, the head_dim' q/k/v dimensions with the largest
L1 norm (the same ones for q, k, v and proj's inputs, so attention scores and outputs stay
consistent), and the MLP's hidden units with the largest fc1 L1 norm.
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
    if family == "swinir":
        return _inherit_swinir(student, pruned)
    if family not in FIRST_CONV:
        raise UserError(f"student_init=inherit is implemented for EDSR, RLFN and SwinIR, not {family}")
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


SWINIR_LAYER = re.compile(r"^layers\.(\d+)\.residual_group\.blocks\.(\d+)\.")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


@torch.no_grad()
def _inherit_swinir(student: nn.Module, pruned: nn.Module) -> dict[str, int]:
    t_cfg, s_cfg = pruned.config, student.config
    for field in ("window_size", "upsampler", "resi_connection", "scale"):
        if getattr(t_cfg, field) != getattr(s_cfg, field):
            raise UserError(
                f"SwinIR inherit needs the teacher's {field}; student has {getattr(s_cfg, field)}"
            )
    if len(set(t_cfg.num_heads) | set(s_cfg.num_heads)) != 1:
        raise UserError("SwinIR inherit needs the same number of heads in every layer of both models")
    heads = s_cfg.num_heads[0]
    t_dim, s_dim = t_cfg.embed_dim, s_cfg.embed_dim
    t_head, s_head = t_dim // heads, s_dim // heads
    s_hidden = int(s_dim * s_cfg.mlp_ratio)
    teacher_state = pruned.state_dict()
    channels = _top(teacher_state["conv_first.weight"].abs().flatten(1).sum(1), s_dim)
    rstb_map = dict(enumerate(evenly_spaced(len(t_cfg.depths), len(s_cfg.depths))))

    def feature(tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        for dim in dims:
            if tensor.shape[dim] == t_dim:
                tensor = tensor.index_select(dim, channels)
        return tensor

    copied = 0
    student_state = student.state_dict()
    for name, target in student_state.items():
        match = SWINIR_LAYER.match(name)
        if match is None:
            source_name = re.sub(r"^layers\.(\d+)\.", lambda m: f"layers.{rstb_map[int(m.group(1))]}.", name)
            source = teacher_state[source_name]
            if "relative_position" not in name:
                source = feature(source, tuple(range(source.dim())))
        else:
            rstb, layer = int(match.group(1)), int(match.group(2))
            prefix = f"layers.{rstb_map[rstb]}.residual_group.blocks.{layer}."
            suffix = name[match.end() :]
            source = _swinir_layer_tensor(
                teacher_state, prefix, suffix, channels, heads, t_head, s_head, s_hidden
            )
        if source.shape != target.shape:
            raise UserError(
                f"cannot inherit {name}: teacher slice {tuple(source.shape)} vs {tuple(target.shape)}"
            )
        target.copy_(source)
        copied += 1
    return {"copied": copied, "skipped": 0, "channels": s_dim, "blocks": len(s_cfg.depths)}


def _swinir_layer_tensor(
    state: dict[str, torch.Tensor],
    prefix: str,
    suffix: str,
    channels: torch.Tensor,
    heads: int,
    t_head: int,
    s_head: int,
    s_hidden: int,
) -> torch.Tensor:
    """The slice of one Swin layer's teacher tensor that becomes the student's `suffix` tensor."""
    t_dim = heads * t_head
    qkv = state[prefix + "attn.qkv.weight"].index_select(1, channels)  # (3·t_dim, s_dim) for the ranking
    # Per head, the head dimensions with the largest L1 norm over their q, k and v rows.
    per_dim = qkv.abs().sum(1).view(3, heads, t_head).sum(0)  # (heads, t_head)
    head_dims = torch.sort(torch.topk(per_dim, s_head, dim=1).indices, dim=1).values
    attention_index = (torch.arange(heads)[:, None] * t_head + head_dims).flatten()  # into heads × t_head
    qkv_rows = torch.cat([attention_index + part * t_dim for part in range(3)])
    fc1 = state[prefix + "mlp.fc1.weight"].index_select(1, channels)
    hidden = _top(fc1.abs().sum(1), s_hidden)  # the MLP's hidden units with the largest fc1 L1 norm
    kept = {  # suffix -> the indices kept along dim 0, dim 1 (fewer entries: the other dims whole)
        "attn.qkv.weight": (qkv_rows, channels),
        "attn.qkv.bias": (qkv_rows,),
        "attn.proj.weight": (channels, attention_index),
        "mlp.fc1.weight": (hidden, channels),
        "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (channels, hidden),
        # per head (the heads are kept) or per window (the window is kept)
        "attn.relative_position_bias_table": (),
        "attn.relative_position_index": (),
        "attn_mask": (),
    }.get(suffix, (channels,))  # norms, proj.bias, fc2.bias: one value per feature channel
    tensor = state[prefix + suffix]
    for dim, index in enumerate(kept):
        tensor = tensor.index_select(dim, index)
    return tensor
