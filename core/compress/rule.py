"""Stage 2: density d → compact architecture triple (method.md §4).

The paper's eq. (6) shrinks depth by r = d^(1/6) in both the number of blocks N_b and the layers per
block N_l + 1; eq. (7), corrected to a square root because the deep-feature parameter count is
quadratic in the width, then gives the width N_c that keeps N_b(N_l+1)N_c² ≈ d·(teacher's):

    N̂_c = N_c · √( d·N_b(N_l+1) / (N̂_b(N̂_l+1)) )

Rounding is an explicit, recorded policy (§4.2):
1. N̂_l = rnd((N_l+1)·r) − 1, clamped to ≥ 1 (the clamp is recorded).
2. N̂_b from N_b·r by `nb_rounding`: nearest, floor, or paper-compat (nearest unless N̂_l was clamped,
   then floor: the clamp kept more layers than eq. (6) asked for). ≥ 1.
3. N̂_c = rnd(eq. 7) with the chosen N̂_b, N̂_l. With `heads` (SwinIR) and/or `channel_multiple`, the
   *unrounded* eq. (7) value is snapped to the nearest multiple m = lcm(heads, channel_multiple), ties
   up, at least m.

rnd is round-half-up, never Python's half-to-even `round`. Stage 2 also has a target mode,
`fit_to_budget`, which searches d for the largest rule output that fits a cost budget.
"""

import math
import operator
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from core.errors import UserError
from core.models.config import Triple

# Above this density the pruning barely removed anything and the "compressed" model is the teacher.
INEFFECTIVE_DENSITY = 0.9


# The authors' student configs (§2.3); stage 2 may use them instead of the rule.
PRESET_TRIPLES: dict[str, Triple] = {
    "swinir_mini": Triple(nc=24, nl=4, nb=3),
    "edsr_mini": Triple(nc=16, nl=1, nb=8),
}

# In JSON a triple reads {"nc": .., "nl": .., "nb": ..}; a dict or a 3-list both validate back.
TripleField = Annotated[Triple, PlainSerializer(lambda t: t._asdict(), when_used="json")]


class RoundingPolicy(BaseModel):
    """How the real-valued eq. (6)/(7) outputs become integers (§4.2). Recorded with every result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nb_rounding: Literal["nearest", "floor", "paper-compat"] = "paper-compat"
    channel_multiple: int | None = Field(default=None, ge=1)
    root: Literal["sqrt", "cbrt"] = "sqrt"  # cbrt = the literal printed eq. (7), for comparison only
    heads: int | None = Field(default=None, ge=1)  # SwinIR attention heads; the width must divide by it

    @property
    def channel_step(self) -> int:
        """The multiple N̂_c must be: lcm of heads and channel_multiple (1 when neither is set)."""
        return math.lcm(self.heads or 1, self.channel_multiple or 1)


class RuleResult(BaseModel):
    """Everything §4.4 asks to record about one application of the rule (JSON via model_dump_json)."""

    model_config = ConfigDict(frozen=True)

    teacher: TripleField
    d: float
    r: float  # d^(1/6)
    raw_l: float  # unrounded N̂_l = (N_l+1)·r − 1
    raw_b: float  # unrounded N̂_b = N_b·r
    raw_c: float  # unrounded eq. (7) with the chosen N̂_b, N̂_l (and the policy's root)
    nb_rounding_used: Literal["nearest", "floor"]  # what paper-compat resolved to
    clamps: list[str]  # which of "nl", "nb", "nc" were raised to their minimum
    triple: TripleField
    policy: RoundingPolicy


class BudgetResult(BaseModel):
    """Target mode: the largest d whose rule output costs at most `budget`."""

    model_config = ConfigDict(frozen=True)

    d: float
    triple: TripleField
    cost: float
    budget: float
    tol: float
    rule: RuleResult
    segments: int  # (N̂_l, N̂_b) segments of (0, 1] the search saw
    cost_evaluations: int  # distinct triples whose cost was computed


def round_half_up(x: float) -> int:
    """Nearest integer, halves away from −∞ (2.5 → 3, 3.5 → 4), unlike Python's half-to-even round.

    x − floor(x) is exact in floating point, so values just under a half (0.49999999999999994) stay down.
    """
    lower = math.floor(x)
    return int(lower + 1 if x - lower >= 0.5 else lower)


def _check_teacher(teacher: Triple) -> Triple:
    """A Triple of Python ints >= 1 (accepts any 3-sequence of integer-likes, e.g. numpy ints)."""
    values = tuple(teacher)
    if len(values) != 3:
        raise UserError(f"teacher must be (nc, nl, nb), got {teacher!r}")
    checked = []
    for name, value in zip(Triple._fields, values, strict=True):
        try:
            integer = operator.index(value)
        except TypeError:
            integer = None
        if integer is None or isinstance(value, bool) or integer < 1:
            raise UserError(f"teacher {name} must be an integer >= 1, got {value!r}")
        checked.append(integer)
    return Triple(*checked)


def _check_density(d: float) -> float:
    d = float(d)
    if not 0.0 <= d <= 1.0:  # also rejects NaN
        raise UserError(f"density d must be in [0, 1], got {d}")
    return d


def _snap_channels(raw_c: float, step: int) -> int:
    """Nearest multiple of `step` (ties up), at least `step`; step 1 is plain round-half-up, ≥ 1."""
    return max(step, step * round_half_up(raw_c / step))


def compact_triple(teacher: Triple, d: float, policy: RoundingPolicy | None = None) -> RuleResult:
    """Apply eq. (6) and corrected eq. (7) to the teacher's triple for density d (§4.2)."""
    teacher = _check_teacher(teacher)
    d = _check_density(d)
    policy = policy or RoundingPolicy()
    clamps: list[str] = []

    r = d ** (1.0 / 6.0)

    # 1. Layers per block: the paper shrinks N_l + 1 (a block's last conv is not in N_l).
    raw_l = (teacher.nl + 1) * r - 1.0
    nl = round_half_up((teacher.nl + 1) * r) - 1
    if nl < 1:
        nl = 1
        clamps.append("nl")

    # 2. Blocks. paper-compat: floor only when the N̂_l clamp already kept extra layers.
    raw_b = teacher.nb * r
    if policy.nb_rounding == "paper-compat":
        nb_rounding_used = "floor" if "nl" in clamps else "nearest"
    else:
        nb_rounding_used = policy.nb_rounding
    nb = math.floor(raw_b) if nb_rounding_used == "floor" else round_half_up(raw_b)
    if nb < 1:
        nb = 1
        clamps.append("nb")

    # 3. Width from the chosen depth, so N̂_b(N̂_l+1)N̂_c² ≈ d·N_b(N_l+1)N_c².
    ratio = d * teacher.nb * (teacher.nl + 1) / (nb * (nl + 1))
    raw_c = teacher.nc * (math.sqrt(ratio) if policy.root == "sqrt" else ratio ** (1.0 / 3.0))
    step = policy.channel_step
    if step * round_half_up(raw_c / step) < step:
        clamps.append("nc")
    nc = _snap_channels(raw_c, step)

    return RuleResult(
        teacher=teacher,
        d=d,
        r=r,
        raw_l=raw_l,
        raw_b=raw_b,
        raw_c=raw_c,
        nb_rounding_used=nb_rounding_used,
        clamps=clamps,
        triple=Triple(nc=nc, nl=nl, nb=nb),
        policy=policy,
    )


def is_ineffective(pruned_d: float, teacher: Triple, chosen: Triple) -> bool:
    """True when compression would not compress: pruning kept > 90% of the weights, or the rule
    returned the teacher's own triple."""
    return pruned_d > INEFFECTIVE_DENSITY or Triple(*chosen) == Triple(*teacher)


def _depth_segments(teacher: Triple, policy: RoundingPolicy) -> list[float]:
    """Sorted starts of the intervals of [0, 1] on which the rule's (N̂_l, N̂_b) is constant.

    Both N̂_l and N̂_b are non-decreasing in d (paper-compat switches from floor to nearest as d grows,
    and nearest ≥ floor), so equal depths at both ends of an interval mean the depth is constant inside
    it; bisection then pins each change down to ~1e-13. The rule itself is the oracle, so floating-point
    boundaries agree with what compact_triple returns.
    """

    def depth(d: float) -> tuple[int, int]:
        triple = compact_triple(teacher, d, policy).triple
        return triple.nl, triple.nb

    starts = [0.0]

    def find_changes(lo: float, hi: float, depth_lo: tuple[int, int], depth_hi: tuple[int, int]) -> None:
        if depth_lo == depth_hi:
            return
        if hi - lo <= 1e-13:
            starts.append(hi)  # the new depth holds from hi on
            return
        mid = 0.5 * (lo + hi)
        depth_mid = depth(mid)
        find_changes(lo, mid, depth_lo, depth_mid)
        find_changes(mid, hi, depth_mid, depth_hi)

    find_changes(0.0, 1.0, depth(0.0), depth(1.0))
    return starts


def fit_to_budget(
    teacher: Triple,
    policy: RoundingPolicy | None,
    cost: Callable[[Triple], float],
    budget: float,
    tol: float = 1e-6,
) -> BudgetResult:
    """Largest d in [0, 1] (to within `tol`) whose rule output has cost ≤ budget, and that output.

    `cost` (e.g. a parameter or MAC count) must be non-decreasing in each of N_c, N_l, N_b.

    Why not a plain bisection on d: cost(rule(d)) is not monotone. Where N̂_b or N̂_l steps up, eq. (7)
    divides by the larger depth and N̂_c drops, so the cost can fall (SwinIR-LW under `floor`:
    (30, 4, 2) costs more than the (24, 4, 3) of a larger d). It *is* monotone where the depth
    (N̂_l, N̂_b) is fixed, since there only N̂_c moves and it grows with d. So we
    1. split [0, 1] into the few constant-depth segments (rule evaluations only, no cost calls);
    2. scan the segments from the top: a segment whose first d already exceeds the budget has no
       feasible d at all; the first one that fits at its start holds the answer;
    3. bisect inside that segment, then verify the returned d's triple fits.
    Every d above the result (by more than tol) is over budget. Costs are cached per distinct triple.
    Raises UserError when even the smallest triple (d = 0: N̂_l = N̂_b = 1, minimum width) is over budget.
    """
    teacher = _check_teacher(teacher)
    policy = policy or RoundingPolicy()
    budget = float(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise UserError(f"budget must be a positive finite number, got {budget}")
    if not 0 < tol < 1:
        raise UserError(f"tol must be in (0, 1), got {tol}")

    cost_cache: dict[Triple, float] = {}

    def cost_at(d: float) -> float:
        triple = compact_triple(teacher, d, policy).triple
        if triple not in cost_cache:
            cost_cache[triple] = float(cost(triple))
        return cost_cache[triple]

    def fits(d: float) -> bool:
        return cost_at(d) <= budget

    if not fits(0.0):
        smallest = compact_triple(teacher, 0.0, policy).triple
        raise UserError(
            f"budget {budget:g} is below the cost {cost_at(0.0):g} of the smallest architecture "
            f"(nc={smallest.nc}, nl={smallest.nl}, nb={smallest.nb})"
        )

    starts = _depth_segments(teacher, policy)
    if fits(1.0):
        found = 1.0
    else:
        # The highest segment that fits at its start (scanned top-down, so lower segments cost
        # nothing); segment 0 starts at d = 0, which fits.
        top = len(starts) - 1
        while top > 0 and not fits(starts[top]):
            top -= 1
        lo = starts[top]
        hi = starts[top + 1] if top + 1 < len(starts) else 1.0  # invariant: fits(lo); no d in [hi, 1] fits
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            if fits(mid):
                lo = mid
            else:
                hi = mid
        found = lo

    rule = compact_triple(teacher, found, policy)
    found_cost = cost_at(found)
    if found_cost > budget:  # cannot happen with a cost that is monotone per component
        raise RuntimeError(f"fit_to_budget verification failed at d={found}: cost {found_cost} > {budget}")
    return BudgetResult(
        d=found,
        triple=rule.triple,
        cost=found_cost,
        budget=budget,
        tol=tol,
        rule=rule,
        segments=len(starts),
        cost_evaluations=len(cost_cache),
    )
