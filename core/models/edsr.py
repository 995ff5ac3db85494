"""EDSR (Lim et al. 2017) with BasicSR's module names (basicsr/archs/edsr_arch.py), method.md §2.1.

Public interface: RGB in [0, 1] -> RGB in [0, 1]. Inside, the convs see (x - mean) * 255 as the
published weights require. EDSR-PyTorch names are converted on load (checkpoint.py), not here.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.config import EDSRConfig
from core.models.statedict import count_indexed, scale_from_upsample

# DIV2K RGB mean in [0, 1] units, shared by EDSR and SwinIR.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class Upsample(nn.Sequential):
    """BasicSR arch_util.Upsample: (conv C->4C + PixelShuffle(2)) per factor 2, or conv C->9C + PS(3)."""

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"scale {scale} is not supported; supported: powers of 2 and 3")
        super().__init__(*layers)


class ResidualBlockNoBN(nn.Module):
    """conv3x3 - ReLU - conv3x3, scaled by res_scale and added to the input; PyTorch default init."""

    def __init__(self, num_feat: int, res_scale: float) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x))) * self.res_scale


class MeanShiftConv(nn.Conv2d):
    """EDSR-PyTorch's MeanShift: a frozen 1x1 conv adding sign * 255 * mean (identity weight)."""

    def __init__(self, sign: int) -> None:
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * 255.0 * torch.tensor(DIV2K_RGB_MEAN))
        self.requires_grad_(False)


class EDSR(nn.Module):
    def __init__(self, config: EDSRConfig) -> None:
        super().__init__()
        self.config = config
        self.img_range = 255.0
        c = config.num_feat
        # Not persistent: BasicSR keeps the mean outside the state_dict, so checkpoints load strictly.
        self.register_buffer("mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        if config.mean_convs:
            self.sub_mean = MeanShiftConv(sign=-1)
            self.add_mean = MeanShiftConv(sign=+1)
        self.conv_first = nn.Conv2d(3, c, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(c, config.res_scale) for _ in range(config.num_block)])
        self.conv_after_body = nn.Conv2d(c, c, 3, 1, 1)
        self.upsample = Upsample(config.scale, c)
        self.conv_last = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.config.mean_convs:
            x = self.sub_mean(x * self.img_range)
        else:
            x = (x - self.mean.to(x.dtype)) * self.img_range
        x = self.conv_first(x)
        res = self.conv_after_body(self.body(x)) + x
        x = self.conv_last(self.upsample(res))
        if self.config.mean_convs:
            return self.add_mean(x) / self.img_range
        return x / self.img_range + self.mean.to(x.dtype)


# --- reading checkpoints (core.models.checkpoint dispatches here) -------------------------------------

# EDSR stores no res_scale; known (num_feat, num_block) shapes imply it (method.md §2.3).
RES_SCALE_BY_SHAPE = {(256, 32): 0.1, (16, 8): 2.0}


def matches(sd: dict[str, Tensor]) -> bool:
    return "conv_first.weight" in sd and "body.0.conv1.weight" in sd


def detect(sd: dict[str, Tensor]) -> tuple[EDSRConfig, list[str]]:
    num_feat = sd["conv_first.weight"].shape[0]
    num_block = count_indexed(sd, "body.{}.conv1.weight")
    res_scale = RES_SCALE_BY_SHAPE.get((num_feat, num_block), 1.0)
    notes = [
        f"res_scale {res_scale:g} assumed from the shape {num_feat}x{num_block} (checkpoints do not store it)"
    ]
    config = EDSRConfig(
        scale=scale_from_upsample(sd, num_feat),
        num_feat=num_feat,
        num_block=num_block,
        res_scale=res_scale,
        mean_convs="sub_mean.weight" in sd,
    )
    return config, notes


_EDSR_PYTORCH_RULES = [
    (re.compile(r"^head\.0\."), "conv_first."),
    (re.compile(r"^body\.(\d+)\.body\.0\."), r"body.\1.conv1."),
    (re.compile(r"^body\.(\d+)\.body\.2\."), r"body.\1.conv2."),
    (re.compile(r"^tail\.0\.(\d+)\."), r"upsample.\1."),
    (re.compile(r"^tail\.1\."), "conv_last."),
]


def from_edsr_pytorch(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename EDSR-PyTorch keys (head/body.i.body.k/body.B/tail) to BasicSR's; keep sub_/add_mean."""
    # body.{B} (a bare conv, no `.body.` inside) is the conv after the residual blocks.
    after_body = {int(m.group(1)) for key in tensors if (m := re.match(r"^body\.(\d+)\.weight$", key))}
    renamed = {}
    for key, value in tensors.items():
        new = key
        if (m := re.match(r"^body\.(\d+)\.(weight|bias)$", key)) and int(m.group(1)) in after_body:
            new = f"conv_after_body.{m.group(2)}"
        else:
            for pattern, replacement in _EDSR_PYTORCH_RULES:
                new = pattern.sub(replacement, new)
        renamed[new] = value
    return renamed
