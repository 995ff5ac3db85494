"""RLFN / RLFN-S (Kong et al. 2022; bytedance/RLFN model/{rlfn,rlfn_s,block}.py), method.md §2.5.

Keys match the official files (`conv_1`, `block_{i}.{c1_r,c2_r,c3_r,c5,esa.*}`, `conv_2`, `upsampler.0`)
so the published weights load unchanged. The official network works on [0, 255] pixels with no mean
shift; this one takes and returns [0, 1] and scales by 255 inside. A compressed RLFN generalises the
block to `convs_per_block` 3x3 convs (`c1_r` .. `c{k}_r`) and any number of blocks.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.models.config import RLFNConfig
from core.models.statedict import count_indexed, scale_from_pixelshuffle_conv

LEAKY_SLOPE = 0.05
# ESA: stride-2 3x3 conv (no padding) then a 7x7 max-pool, so each side needs >= 15 input pixels.
MIN_INPUT_SIDE = 15


class ESA(nn.Module):
    """Enhanced Spatial Attention as used in RLFN (no conv_max / conv3_)."""

    def __init__(self, esa_channels: int, channels: int) -> None:
        super().__init__()
        f = esa_channels
        self.conv1 = nn.Conv2d(channels, f, kernel_size=1)
        self.conv_f = nn.Conv2d(f, f, kernel_size=1)
        self.conv2 = nn.Conv2d(f, f, kernel_size=3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(f, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        c1_ = self.conv1(x)
        c3 = self.conv3(F.max_pool2d(self.conv2(c1_), kernel_size=7, stride=3))
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        attention = self.conv4(c3 + self.conv_f(c1_)).sigmoid()
        return x * attention


class RLFB(nn.Module):
    """Residual Local Feature Block: k x (conv3x3 + LeakyReLU 0.05), + input, conv1x1 `c5`, ESA."""

    def __init__(self, channels: int, num_convs: int, esa_channels: int) -> None:
        super().__init__()
        self.num_convs = num_convs
        for i in range(1, num_convs + 1):
            self.add_module(f"c{i}_r", nn.Conv2d(channels, channels, 3, padding=1))
        self.c5 = nn.Conv2d(channels, channels, 1)
        self.esa = ESA(esa_channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i in range(1, self.num_convs + 1):
            out = F.leaky_relu(getattr(self, f"c{i}_r")(out), LEAKY_SLOPE)
        return self.esa(self.c5(out + x))


class RLFN(nn.Module):
    def __init__(self, config: RLFNConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.pixel_range = 255.0
        self.conv_1 = nn.Conv2d(3, c, 3, padding=1)
        for i in range(1, config.num_blocks + 1):
            self.add_module(f"block_{i}", RLFB(c, config.convs_per_block, config.esa_channels))
        self.conv_2 = nn.Conv2d(c, c, 3, padding=1)
        self.upsampler = nn.Sequential(
            nn.Conv2d(c, 3 * config.scale**2, 3, padding=1), nn.PixelShuffle(config.scale)
        )

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if min(h, w) < MIN_INPUT_SIDE:
            raise UserError(
                f"RLFN needs an input of at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} pixels, got {w}x{h}"
            )
        features = self.conv_1(x * self.pixel_range)
        out = features
        for i in range(1, self.config.num_blocks + 1):
            out = getattr(self, f"block_{i}")(out)
        out = self.conv_2(out) + features
        return self.upsampler(out) / self.pixel_range


# --- reading checkpoints (core.models.checkpoint dispatches here) -------------------------------------


def matches(sd: dict[str, Tensor]) -> bool:
    return "conv_1.weight" in sd and "block_1.c5.weight" in sd


def detect(sd: dict[str, Tensor]) -> tuple[RLFNConfig, list[str]]:
    config = RLFNConfig(
        scale=scale_from_pixelshuffle_conv(sd["upsampler.0.weight"].shape[0], "upsampler.0"),
        channels=sd["conv_1.weight"].shape[0],
        num_blocks=count_indexed(sd, "block_{}.c5.weight", start=1),
        convs_per_block=count_indexed(sd, "block_1.c{}_r.weight", start=1),
        esa_channels=sd["block_1.esa.conv1.weight"].shape[0],
    )
    return config, []
