"""EDSR (Lim et al. 2017) with BasicSR's module names (basicsr/archs/edsr_arch.py), method.md §2.1.

Public interface: RGB in [0, 1] -> RGB in [0, 1]. Inside, the convs see (x - mean) * 255 as the
published weights require. EDSR-PyTorch names are converted on load (checkpoint.py), not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.config import EDSRConfig

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
