"""Training-time over-parameterization of 3×3 convs, folded away after training.

Each 3×3 kernel W of the student is trained as a sum of linear branches (ExpandNets, Guo et al. 2020;
the re-parameterizable blocks of ECBSR, Zhang et al. 2021, without their fixed Sobel/Laplacian ones):

    W = W₃ + center(W₁) + Σₑ B[:, e] ⊗ A[e, :]

W₃ is the conv's own weight, W₁ a 1×1 kernel added to the centre tap, and B·A a 1×1 expansion to
`width` channels followed by a 3×3 back (no bias in between, so the composition is exactly one 3×3
conv, whatever the conv's stride or padding). The function class is unchanged; only the optimizer's
view of it is: a tiny model gets the optimization of a wider one. The branches are summed into W
before every conv call (`torch.nn.utils.parametrize`), so a step costs no extra convolutions, and
`fold` leaves a plain conv with the summed weight: the trained model is the architecture it names.

The extra branches start at zero (W₁ = 0, B = 0), so an inherited student starts as the function it
inherited.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


class ExpandedKernel(nn.Module):
    """The parametrization W₃ ↦ W₃ + center(W₁) + B·A of one 3×3 conv's weight."""

    def __init__(self, out_channels: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.one_by_one = nn.Parameter(torch.zeros(out_channels, in_channels))
        self.expand = nn.Parameter(torch.randn(width, in_channels) / math.sqrt(in_channels))
        self.project = nn.Parameter(torch.zeros(out_channels, width, 3, 3))

    def forward(self, kernel: torch.Tensor) -> torch.Tensor:
        expanded = torch.einsum("oekl,ei->oikl", self.project, self.expand)
        centre = nn.functional.pad(self.one_by_one[:, :, None, None], (1, 1, 1, 1))
        return kernel + expanded + centre


def expandable(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (3, 3)
        and module.groups == 1
        and module.dilation == (1, 1)
        and not parametrize.is_parametrized(module)
    )


def overparameterize(model: nn.Module, width_multiple: float) -> int:
    """Give every 3×3 conv of `model` the branches above, in place, with an expansion of
    `width_multiple` × its input channels; returns how many convs it changed."""
    convs = [m for m in model.modules() if expandable(m)]
    for conv in convs:
        width = max(1, round(width_multiple * conv.in_channels))
        kernel = ExpandedKernel(conv.out_channels, conv.in_channels, width).to(conv.weight)
        parametrize.register_parametrization(conv, "weight", kernel)
    return len(convs)


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Sum every over-parameterized conv's branches into its weight, in place: plain convs again."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
