"""Losses of the pruning and distillation stages (method.md §3 and §5).

- Pruning minimises the Charbonnier loss; the ℓ1 term is applied by the optimizer (core.prune).
- The paper's distillation loss is  alpha·L1(student, gt) + L_Lap(student, teacher) + L_Lap(HF student,
  HF teacher) (`paper` below), where L_Lap is a 5-level Laplacian-pyramid L1 with per-level *means*
  weighted 2^i (the authors' MultiLapLoss) and HF(x) = x − G(x) is the high-pass residual of the 5×5
  binomial blur G. The other DISTILL_LOSSES are the variants bench/recipes.py compares.

Everything works in float32 and float64 on (N, C, H, W) tensors, each channel filtered on its own. The
blur, pooling and upsampling are separable, so each is a pair of small matmuls (rows, then columns).
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.recipe import DISTILL_LOSSES

LAPLACIAN_LEVELS = 5


def charbonnier_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean √((x − y)² + ε²). The paper's form: ε squared under the root (BasicSR adds 1e-12 instead)."""
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


BINOMIAL_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)  # /16: the 1-D factor of the 5×5 Gaussian G


@functools.lru_cache(maxsize=64)
def _pyramid_operators(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The 1-D operators along an axis of length n, as matrices (constants, cached per size):

    blur (n×n): [1,4,6,4,1]/16 with reflect padding 2 (mirror without repeating the edge pixel);
    down (n/2×n): the blur, then the mean of each pixel pair (2×2 average pooling, per axis);
    up (n×n/2): zero insertion at even positions, then 2·blur (4·G in 2-D fills the holes).
    """
    if n < 3:
        raise ValueError(f"the 5x5 reflect-padded blur needs at least 3 pixels along an axis, got {n}")
    blur = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for offset, tap in zip(range(-2, 3), BINOMIAL_TAPS, strict=True):
            j = abs(i + offset)  # reflect at the start …
            j = 2 * (n - 1) - j if j > n - 1 else j  # … and at the end
            blur[i, j] += tap / 16.0
    pairs = torch.arange(n // 2)
    pool = torch.zeros(n // 2, n, dtype=torch.float64)
    pool[pairs, 2 * pairs] = pool[pairs, 2 * pairs + 1] = 0.5
    down = pool @ blur
    up = 2.0 * blur[:, 0::2]  # blur @ zero-insertion: only the even columns of the blur are read
    return tuple(m.to(dtype=dtype, device=device) for m in (blur, down, up))


def _separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ x @ colsᵀ over the last two dims: a separable linear filter as two matmuls."""
    return rows @ x @ cols.transpose(0, 1)


def _operators(x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    return (
        _pyramid_operators(x.shape[-2], x.dtype, x.device),
        _pyramid_operators(x.shape[-1], x.dtype, x.device),
    )


def gaussian_blur5(x: torch.Tensor) -> torch.Tensor:
    """5×5 binomial blur outer([1,4,6,4,1])/256, per channel, reflect padding 2 (mirror without
    repeating the edge pixel).

    Computed as two matmuls with the 1-D blur as a matrix (the blur is separable and the padding is
    per axis): the same numbers as a depthwise conv, but a handful of GEMMs instead of dozens of small
    elementwise passes, forward and backward. The KD loss applies 17 such filters per training step
    (the blur of HF, and a pool and an upsampling per pyramid level, each a matrix product of the
    blur); in the elementwise form they cost more than the student's own forward pass on a CPU.
    """
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur5 expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    (blur_h, _, _), (blur_w, _, _) = _operators(x)
    return _separable(x, blur_h, blur_w)


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
        (_, down_h, up_h), (_, down_w, up_w) = _operators(current)
        down = _separable(current, down_h, down_w)
        pyramid.append(current - _separable(down, up_h, up_w))
        current = down
    pyramid.append(current)
    return pyramid


def laplacian_level_means(
    x: torch.Tensor, y: torch.Tensor, levels: int = LAPLACIAN_LEVELS
) -> list[torch.Tensor]:
    """Unweighted mean|P_i(x) − P_i(y)| per level, P_0 finest (for logging and tests)."""
    return [level.abs().mean() for level in laplacian_pyramid(x - y, levels)]


def laplacian_norm(
    difference: torch.Tensor,
    levels: int = LAPLACIAN_LEVELS,
    level_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Σ_i 2^i · mean|P_i(difference)|: L_Lap of two images given their difference (other per-level
    weights, finest first, with `level_weights`).

    The pyramid is linear (blur, pool, zero-insertion, differences), so P_i(x) − P_i(y) = P_i(x − y):
    one pyramid of the difference costs half of two pyramids, in the loss of every training step.
    """
    pyramid = laplacian_pyramid(difference, levels)
    weights = level_weights or tuple(2.0**i for i in range(levels))
    return sum(w * level.abs().mean() for w, level in zip(weights, pyramid, strict=True))


def laplacian_loss(x: torch.Tensor, y: torch.Tensor, levels: int = LAPLACIAN_LEVELS) -> torch.Tensor:
    """L_Lap(x, y) = Σ_i 2^i · mean|P_i(x) − P_i(y)|; the low-pass level gets the largest weight.

    Means, not sums: the summed variant (ST-MFNet) is 10⁴–10⁶ times larger and swamps the L1 term.
    """
    return laplacian_norm(x - y, levels)


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """HF(x) = x − G(x): the high-pass residual, not the blurred image."""
    return x - gaussian_blur5(x)


@dataclass(frozen=True)
class LossParts:
    """A distillation loss and its parts (scalar tensors; `total` carries the graph)."""

    total: torch.Tensor
    l1: torch.Tensor  # L1(student, gt), before its weight
    teacher: torch.Tensor  # the full-band term to the teacher (L_Lap, or L1 of the pixels)
    teacher_hf: torch.Tensor  # the same on the high-pass residuals HF(student), HF(teacher)

    def as_floats(self) -> dict[str, float]:
        """Detached Python floats for logging."""
        return {
            name: float(getattr(self, name).detach()) for name in ("total", "l1", "teacher", "teacher_hf")
        }


def _laplacian_terms(
    student: torch.Tensor, teacher: torch.Tensor, level_weights: tuple[float, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_Lap(student, teacher), L_Lap(HF student, HF teacher)), both from the one difference image:
    the pyramid and HF are linear, so HF(student) − HF(teacher) = HF(student − teacher)."""
    # Contiguous (NCHW): a channels-last student output would be copied by every matmul of the pyramid.
    difference = (student - teacher).contiguous()
    return (
        laplacian_norm(difference, level_weights=level_weights),
        laplacian_norm(high_frequency(difference), level_weights=level_weights),
    )


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_dis = L_Lap(student, teacher) + L_Lap(HF student, HF teacher)."""
    lap, lap_hf = _laplacian_terms(student, teacher)
    return lap + lap_hf


def kd_loss_parts(
    student: torch.Tensor, teacher: torch.Tensor, gt: torch.Tensor, alpha: float = 0.1
) -> LossParts:
    """The paper's loss, alpha·L1(student, gt) + L_dis(student, teacher), with every part kept."""
    return distill_loss_parts("paper", student, teacher, gt, alpha)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, gt: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    """The total KD loss L_total (paper eq. 8–9, α = 0.1); see kd_loss_parts for the parts."""
    return kd_loss_parts(student, teacher, gt, alpha).total


# The losses a student can be trained with (bench/recipes.py measures them side by side):
# - paper: alpha·L1(s, gt) + L_Lap(s, t) + L_Lap(HF s, HF t) — eq. 8–9, levels weighted 1…16;
# - laplacian_flat: the same with every pyramid level weighted 1;
# - pixel_hf: alpha·L1(s, gt) + L1(s, t) + L1(HF s, HF t) — the best teacher-driven loss: the teacher's
#   output as the target, plus its high frequencies, without the 16×-weighted low-pass band (which the
#   LR input already fixes, yet keeps a constant-size gradient there however small the error);
# - l1_gt: L1(s, gt), no teacher; l1_teacher: L1(s, t), no ground truth;
# - l2_gt: the mean squared error to gt, PSNR's own objective (a run's `l2_finish` ends on it);
# - blend: 0.5·L1(s, gt) + 0.5·L1(s, t).
FLAT_LEVELS = (1.0,) * LAPLACIAN_LEVELS


def distill_loss_parts(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    gt: torch.Tensor,
    alpha: float = 0.1,
) -> LossParts:
    """The named distillation loss (DISTILL_LOSSES) of a student batch, with its parts."""
    zero = student.new_zeros(())
    l1 = F.l1_loss(student, gt)
    if name == "l1_gt":
        return LossParts(total=l1, l1=l1, teacher=zero, teacher_hf=zero)
    if name == "l2_gt":
        return LossParts(total=F.mse_loss(student, gt), l1=l1, teacher=zero, teacher_hf=zero)
    if teacher is None:
        raise ValueError(f"the {name!r} loss needs the teacher's output")
    if name in ("paper", "laplacian_flat"):
        weights = FLAT_LEVELS if name == "laplacian_flat" else None
        lap, lap_hf = _laplacian_terms(student, teacher, weights)
        return LossParts(total=alpha * l1 + lap + lap_hf, l1=l1, teacher=lap, teacher_hf=lap_hf)
    difference = student - teacher
    to_teacher = difference.abs().mean()
    if name == "l1_teacher":
        return LossParts(total=to_teacher, l1=l1, teacher=to_teacher, teacher_hf=zero)
    if name == "blend":
        return LossParts(total=0.5 * l1 + 0.5 * to_teacher, l1=l1, teacher=to_teacher, teacher_hf=zero)
    if name == "pixel_hf":
        hf = high_frequency(difference.contiguous()).abs().mean()
        return LossParts(total=alpha * l1 + to_teacher + hf, l1=l1, teacher=to_teacher, teacher_hf=hf)
    raise ValueError(f"unknown distillation loss {name!r}; choose one of {', '.join(DISTILL_LOSSES)}")
