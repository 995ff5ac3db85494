"""Losses of the pruning and distillation stages (method.md §3 and §5).

- Pruning minimises the Charbonnier loss; the ℓ1 term is applied by the optimizer (core.prune).
- Distillation minimises  alpha·L1(student, gt) + L_Lap(student, teacher) + L_Lap(HF student, HF teacher),
  where L_Lap is a 5-level Laplacian-pyramid L1 with per-level *means* weighted 2^i (the authors'
  MultiLapLoss) and HF(x) = x − G(x) is the high-pass residual of the 5×5 binomial blur G.

Everything works in float32 and float64 on (N, C, H, W) tensors; the blur is depthwise over C channels.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAPLACIAN_LEVELS = 5


def charbonnier_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean √((x − y)² + ε²). The paper's form: ε squared under the root (BasicSR adds 1e-12 instead)."""
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


def _binomial_taps(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[1, 4, 6, 4, 1]/16 along `dim` of an input padded by 2 there ('valid': the result is 4 shorter)."""
    n = x.shape[dim] - 4
    tap = lambda i: x.narrow(dim, i, n)  # noqa: E731
    return (tap(0) + tap(4) + 4.0 * (tap(1) + tap(3)) + 6.0 * tap(2)) / 16.0


def gaussian_blur5(x: torch.Tensor) -> torch.Tensor:
    """5×5 binomial blur outer([1,4,6,4,1])/256, per channel, reflect padding 2 (mirror without
    repeating the edge pixel).

    Applied as two 1-D passes of shifted adds rather than a depthwise conv: the same numbers, but on a
    CPU about 8× faster forward and backward (depthwise 5×5 convs are a slow path in oneDNN), which
    matters because the KD loss runs this 34 times per step.
    """
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur5 expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return _binomial_taps(_binomial_taps(padded, 2), 3)


def _upsample_zero_insert(x: torch.Tensor) -> torch.Tensor:
    """2× upsampling: values at even (0-based) positions, zeros elsewhere, then 4·G to fill the holes."""
    n, c, h, w = x.shape
    holes = x.new_zeros(n, c, 2 * h, 2 * w)
    holes[:, :, ::2, ::2] = x
    return 4.0 * gaussian_blur5(holes)


def laplacian_pyramid(x: torch.Tensor, levels: int = LAPLACIAN_LEVELS) -> list[torch.Tensor]:
    """Band-pass levels finest first, then the final low-pass image (method.md §5.1).

    Each of the levels−1 steps: b = G(cur); down = 2×2 average pool of b; up = 4·G(zero-inserted down);
    emit cur − up; cur = down. H and W must be divisible by 2^(levels−1) so every pool is exact, and
    large enough for the reflect padding of the coarsest blur (≥ 32 for 5 levels).
    """
    if levels < 1:
        raise ValueError(f"laplacian_pyramid needs levels >= 1, got {levels}")
    factor = 2 ** (levels - 1)
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"laplacian_pyramid with {levels} levels needs H and W divisible by {factor}, "
            f"got {height}×{width} (crop or pad the patch)"
        )
    # The coarsest blur runs on H/2^(levels−2) × W/2^(levels−2); reflect padding 2 needs ≥ 3 there.
    coarsest = max(1, factor // 2)
    if levels > 1 and min(height, width) // coarsest < 3:
        smallest = factor * math.ceil(3 * coarsest / factor)
        raise ValueError(
            f"laplacian_pyramid with {levels} levels needs H and W >= {smallest}, got {height}×{width}"
        )
    pyramid = []
    current = x
    for _ in range(levels - 1):
        down = F.avg_pool2d(gaussian_blur5(current), kernel_size=2, stride=2)
        pyramid.append(current - _upsample_zero_insert(down))
        current = down
    pyramid.append(current)
    return pyramid


def laplacian_level_means(
    x: torch.Tensor, y: torch.Tensor, levels: int = LAPLACIAN_LEVELS
) -> list[torch.Tensor]:
    """Unweighted mean|P_i(x) − P_i(y)| per level, P_0 finest (for logging and tests)."""
    return [level.abs().mean() for level in laplacian_pyramid(x - y, levels)]


def laplacian_norm(difference: torch.Tensor, levels: int = LAPLACIAN_LEVELS) -> torch.Tensor:
    """Σ_i 2^i · mean|P_i(difference)|: L_Lap of two images given their difference.

    The pyramid is linear (blur, pool, zero-insertion, differences), so P_i(x) − P_i(y) = P_i(x − y):
    one pyramid of the difference costs half of two pyramids, in the loss of every training step.
    """
    pyramid = laplacian_pyramid(difference, levels)
    return sum((2.0**i) * level.abs().mean() for i, level in enumerate(pyramid))


def laplacian_loss(x: torch.Tensor, y: torch.Tensor, levels: int = LAPLACIAN_LEVELS) -> torch.Tensor:
    """L_Lap(x, y) = Σ_i 2^i · mean|P_i(x) − P_i(y)|; the low-pass level gets the largest weight.

    Means, not sums: the summed variant (ST-MFNet) is 10⁴–10⁶ times larger and swamps the L1 term.
    """
    return laplacian_norm(x - y, levels)


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """HF(x) = x − G(x): the high-pass residual, not the blurred image."""
    return x - gaussian_blur5(x)


@dataclass(frozen=True)
class KDLossParts:
    """The distillation loss and its parts (scalar tensors; `total` carries the graph)."""

    total: torch.Tensor
    l1: torch.Tensor  # L1(student, gt), before the alpha weight
    lap: torch.Tensor  # L_Lap(student, teacher)
    lap_hf: torch.Tensor  # L_Lap(HF student, HF teacher)

    def as_floats(self) -> dict[str, float]:
        """Detached Python floats for logging."""
        return {name: float(getattr(self, name).detach()) for name in ("total", "l1", "lap", "lap_hf")}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_dis = L_Lap(student, teacher) + L_Lap(HF student, HF teacher)."""
    difference = student - teacher
    return laplacian_norm(difference) + laplacian_norm(high_frequency(difference))


def kd_loss_parts(
    student: torch.Tensor, teacher: torch.Tensor, gt: torch.Tensor, alpha: float = 0.1
) -> KDLossParts:
    """alpha·L1(student, gt) + L_dis(student, teacher), with every part kept for logging.

    HF is linear too, so HF(student) − HF(teacher) = HF(student − teacher): both Laplacian terms are
    computed from the one difference image.
    """
    l1 = F.l1_loss(student, gt)
    difference = student - teacher
    lap = laplacian_norm(difference)
    lap_hf = laplacian_norm(high_frequency(difference))
    return KDLossParts(total=alpha * l1 + lap + lap_hf, l1=l1, lap=lap, lap_hf=lap_hf)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, gt: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    """The total KD loss L_total (paper eq. 8–9, α = 0.1); see kd_loss_parts for the parts."""
    return kd_loss_parts(student, teacher, gt, alpha).total
