"""The density → architecture rule of method.md §4: worked examples, preset ranges, policies, target mode."""

import json
import math
from collections.abc import Callable

import numpy as np
import pytest

from core.compress import (
    PRESET_TRIPLES,
    BudgetResult,
    RoundingPolicy,
    RuleResult,
    Triple,
    compact_triple,
    fit_to_budget,
    is_ineffective,
    round_half_up,
)
from core.errors import UserError

SWINIR_LW = Triple(nc=60, nl=6, nb=4)
EDSR_BASELINE = Triple(nc=64, nl=1, nb=16)
SWINIR_POLICY = RoundingPolicy(heads=6)


def edsr_params(t: Triple) -> int:
    """EDSR ×2 parameter count (method.md §2.3): 28C + (2B+1)(9C²+C) + 36C²+4C + 27C + 3."""
    c, _, b = t
    return 28 * c + (2 * b + 1) * (9 * c * c + c) + 36 * c * c + 4 * c + 27 * c + 3


def swinir_params(t: Triple, heads: int = 6, scale: int = 2) -> int:
    """SwinIR pixelshuffledirect parameter count, RPB tables included (method.md §2.3)."""
    c, n_l, n_b = t
    deep = n_b * (n_l * (8 * c * c + 11 * c + 225 * heads) + 9 * c * c + c)
    return 32 * c + deep + 9 * c * c + c + 27 * c * scale**2 + 3 * scale**2


def test_closed_forms_match_the_published_counts() -> None:
    assert edsr_params(EDSR_BASELINE) == 1_369_859
    assert edsr_params(PRESET_TRIPLES["edsr_mini"]) == 49_603
    assert swinir_params(SWINIR_LW) == 910_152
    assert swinir_params(PRESET_TRIPLES["swinir_mini"]) == 98_868


def test_round_half_up() -> None:
    assert [round_half_up(x) for x in (2.5, 3.5, 4.677, 1.115, 8.919, 0.0, 14.49)] == [3, 4, 5, 1, 9, 0, 14]
    assert round_half_up(0.49999999999999994) == 0  # floor(x + 0.5) would give 1
    assert round_half_up(-0.5) == 0 and round_half_up(-0.6) == -1
    assert round(2.5) == 2  # why Python's round is not used


def test_swinir_lw_worked_example() -> None:
    result = compact_triple(SWINIR_LW, 0.089, SWINIR_POLICY)
    print(result.model_dump_json())
    assert result.r == pytest.approx(0.66819, abs=5e-6)
    assert result.raw_l + 1 == pytest.approx(4.677, abs=5e-4)  # 7r
    assert result.raw_b == pytest.approx(2.673, abs=5e-4)  # 4r
    assert result.raw_c == pytest.approx(24.456, abs=5e-4)  # 60·√(0.089·28/15)
    assert result.raw_c == pytest.approx(60 * math.sqrt(0.089 * 28 / 15), rel=1e-14)
    assert result.nb_rounding_used == "nearest" and result.clamps == []
    assert result.triple == Triple(24, 4, 3) == PRESET_TRIPLES["swinir_mini"]
    assert result.triple.nc % 6 == 0 and result.triple.nc // 6 == 4  # head_dim 4

    floor = compact_triple(SWINIR_LW, 0.089, RoundingPolicy(heads=6, nb_rounding="floor"))
    assert floor.triple == Triple(30, 4, 2) and floor.raw_c == pytest.approx(29.95, abs=5e-3)
    nearest = compact_triple(SWINIR_LW, 0.089, RoundingPolicy(heads=6, nb_rounding="nearest"))
    assert nearest.triple == Triple(24, 4, 3)

    cube = compact_triple(SWINIR_LW, 0.089, RoundingPolicy(heads=6, root="cbrt"))
    assert cube.raw_c == pytest.approx(32.98, abs=5e-3)


def test_edsr_baseline_worked_example() -> None:
    result = compact_triple(EDSR_BASELINE, 0.03)  # default policy: paper-compat, sqrt, no heads
    print(result.model_dump_json())
    assert result.r == pytest.approx(0.55743, abs=5e-6)
    assert result.raw_l + 1 == pytest.approx(1.115, abs=5e-4)  # 2r → 1 → 0 → clamped to 1
    assert result.clamps == ["nl"]
    assert result.raw_b == pytest.approx(8.919, abs=5e-4)
    assert result.nb_rounding_used == "floor"  # paper-compat after the N̂_l clamp
    assert result.raw_c == pytest.approx(15.677, abs=5e-4)
    assert result.triple == Triple(16, 1, 8) == PRESET_TRIPLES["edsr_mini"]

    nearest = compact_triple(EDSR_BASELINE, 0.03, RoundingPolicy(nb_rounding="nearest"))
    assert nearest.triple == Triple(15, 1, 9) and nearest.raw_c == pytest.approx(14.78, abs=5e-3)
    floor = compact_triple(EDSR_BASELINE, 0.03, RoundingPolicy(nb_rounding="floor"))
    assert floor.triple == Triple(16, 1, 8)

    cube = compact_triple(EDSR_BASELINE, 0.03, RoundingPolicy(root="cbrt"))
    assert cube.raw_c == pytest.approx(25.06, abs=5e-3)


def test_counted_weights_of_the_presets_are_the_published_densities() -> None:
    # §4.3 last row: the students keep 71,424/823,680 and 39,168/1,216,512 of the counted weights.
    def swinir_counted(t: Triple) -> int:  # RSTB weights: 2 LayerNorms, qkv, proj, fc1, fc2 per STL; conv
        c, n_l, n_b = t
        return n_b * (n_l * (2 * c + 8 * c * c) + 9 * c * c)

    def edsr_counted(t: Triple) -> int:  # block convs and conv_after_body
        c, _, b = t
        return (2 * b + 1) * 9 * c * c

    assert (swinir_counted(SWINIR_LW), swinir_counted(Triple(24, 4, 3))) == (823_680, 71_424)
    assert (edsr_counted(EDSR_BASELINE), edsr_counted(Triple(16, 1, 8))) == (1_216_512, 39_168)
    assert 71_424 / 823_680 == pytest.approx(0.0867, abs=5e-5)
    assert 39_168 / 1_216_512 == pytest.approx(0.0322, abs=5e-5)


# Exact ends of the preset ranges (method.md §4.2 prints them rounded down to 0.07058 / 0.029327):
SWINIR_LOW = (4.5 / 7) ** 6  # 7r = 4.5: N̂_l 3 → 4                         (0.0705808…)
SWINIR_HIGH = 0.45**2 * 15 / 28  # eq. (7) = 27: the head snap goes 24 → 30    (0.1084821…)
EDSR_LOW = (15.5 / 64) ** 2 / 2  # eq. (7) = 15.5: N̂_c 15 → 16                (0.0293273…)
EDSR_HIGH = (9 / 16) ** 6  # 16r = 9: floor N̂_b 8 → 9                    (0.0316763…)


@pytest.mark.parametrize("nb_rounding", ["paper-compat", "nearest"])
def test_swinir_preset_range(nb_rounding: str) -> None:
    policy = RoundingPolicy(heads=6, nb_rounding=nb_rounding)

    def gives_mini(d: float) -> bool:
        return compact_triple(SWINIR_LW, d, policy).triple == Triple(24, 4, 3)

    assert round(SWINIR_LOW, 5) == 0.07058 and round(SWINIR_HIGH, 5) == 0.10848
    assert gives_mini(SWINIR_LOW * (1 + 1e-9)) and not gives_mini(SWINIR_LOW * (1 - 1e-9))
    assert gives_mini(SWINIR_HIGH * (1 - 1e-9)) and not gives_mini(SWINIR_HIGH * (1 + 1e-9))
    assert not gives_mini(SWINIR_HIGH)  # ties go up
    assert all(gives_mini(d) for d in (0.07059, 0.08, 0.089, 0.1, 0.10848))
    assert not any(gives_mini(d) for d in (0.07, 0.07058, 0.10849, 0.11))


@pytest.mark.parametrize("nb_rounding", ["paper-compat", "floor"])
def test_edsr_preset_range(nb_rounding: str) -> None:
    policy = RoundingPolicy(nb_rounding=nb_rounding)

    def gives_mini(d: float) -> bool:
        return compact_triple(EDSR_BASELINE, d, policy).triple == Triple(16, 1, 8)

    assert round(EDSR_LOW, 6) == 0.029327 and round(EDSR_HIGH, 6) == 0.031676
    assert gives_mini(EDSR_LOW * (1 + 1e-9)) and not gives_mini(EDSR_LOW * (1 - 1e-9))
    assert gives_mini(EDSR_HIGH * (1 - 1e-9)) and not gives_mini(EDSR_HIGH * (1 + 1e-9))
    assert all(gives_mini(d) for d in (0.02933, 0.03, 0.031, 0.031676))
    assert not any(gives_mini(d) for d in (0.0293, 0.029327, 0.03168, 0.032))


def test_no_single_plain_rounding_gives_both_presets() -> None:
    grid = np.linspace(1e-4, 1.0, 20_000)
    swinir_floor = RoundingPolicy(heads=6, nb_rounding="floor")
    assert not any(compact_triple(SWINIR_LW, float(d), swinir_floor).triple == (24, 4, 3) for d in grid)
    edsr_nearest = RoundingPolicy(nb_rounding="nearest")
    assert not any(compact_triple(EDSR_BASELINE, float(d), edsr_nearest).triple == (16, 1, 8) for d in grid)


def test_heads_and_channel_multiple_snap_the_unrounded_width() -> None:
    # At depth (3, 2), d = (20.9/60)²·8/28 makes eq. (7) = 20.9: 20.9/6 = 3.48 → 18 channels, whereas
    # rounding first (21, then 21/6 = 3.5) would give 24.
    result = compact_triple(SWINIR_LW, (20.9 / 60) ** 2 * 8 / 28, SWINIR_POLICY)
    assert (result.triple.nl, result.triple.nb) == (3, 2)
    assert result.raw_c == pytest.approx(20.9, abs=1e-12)
    assert result.triple.nc == 18
    for d in np.linspace(0.0, 1.0, 2_001):
        result = compact_triple(SWINIR_LW, float(d), SWINIR_POLICY)
        assert result.triple.nc % 6 == 0 and result.triple.nc >= 6
        assert result.triple.nc == 6 * max(1, round_half_up(result.raw_c / 6))
        both = compact_triple(SWINIR_LW, float(d), RoundingPolicy(heads=6, channel_multiple=8))
        assert both.triple.nc % 24 == 0 and both.triple.nc >= 24  # lcm(6, 8)
        edsr8 = compact_triple(EDSR_BASELINE, float(d), RoundingPolicy(channel_multiple=8))
        assert edsr8.triple.nc % 8 == 0 and edsr8.triple.nc >= 8
    assert compact_triple(EDSR_BASELINE, 0.03, RoundingPolicy(channel_multiple=8)).triple == (16, 1, 8)
    tiny = compact_triple(EDSR_BASELINE, 1e-6, RoundingPolicy(channel_multiple=8))
    assert tiny.triple == (8, 1, 1) and tiny.clamps == ["nl", "nc"]


def test_head_snap_ties_go_up() -> None:
    # Teacher (42, 1, 1), d = 0.25: depth stays (1, 1), eq. (7) = 42·√0.25 = 21 exactly = 3.5 heads → 24.
    result = compact_triple(Triple(42, 1, 1), 0.25, RoundingPolicy(heads=6))
    assert (result.triple.nl, result.triple.nb) == (1, 1)
    assert result.raw_c == 21.0
    assert result.triple.nc == 24
    assert compact_triple(Triple(42, 1, 1), 0.25).triple.nc == 21  # no heads: plain rounding


def test_extremes_minimums_and_the_teacher_itself() -> None:
    assert compact_triple(SWINIR_LW, 1.0, SWINIR_POLICY).triple == SWINIR_LW
    for nb_rounding in ("paper-compat", "nearest", "floor"):
        assert (
            compact_triple(EDSR_BASELINE, 1.0, RoundingPolicy(nb_rounding=nb_rounding)).triple
            == EDSR_BASELINE
        )
    zero = compact_triple(SWINIR_LW, 0.0, SWINIR_POLICY)
    assert zero.triple == (6, 1, 1) and zero.clamps == ["nl", "nb", "nc"]
    assert compact_triple(EDSR_BASELINE, 0.0).triple == (1, 1, 1)


def test_is_ineffective() -> None:
    assert is_ineffective(0.95, EDSR_BASELINE, Triple(60, 1, 16))
    assert is_ineffective(0.5, EDSR_BASELINE, Triple(64, 1, 16))
    assert is_ineffective(0.5, EDSR_BASELINE, (64, 1, 16))  # plain tuples compare too
    assert not is_ineffective(0.9, EDSR_BASELINE, Triple(60, 1, 15))
    assert not is_ineffective(0.03, EDSR_BASELINE, Triple(16, 1, 8))


def test_bad_inputs_raise_user_errors() -> None:
    for d in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="density"):
            compact_triple(EDSR_BASELINE, d)
    with pytest.raises(UserError, match="nc"):
        compact_triple(Triple(0, 1, 16), 0.5)
    with pytest.raises(UserError, match="nc"):
        compact_triple((64.0, 1, 16), 0.5)  # type: ignore[arg-type]
    assert compact_triple((np.int64(64), 1, 16), np.float64(0.03)).triple == (16, 1, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RoundingPolicy(nb_rounding="ceil")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RoundingPolicy(heads=0)


def test_result_is_json_serialisable_and_round_trips() -> None:
    result = compact_triple(SWINIR_LW, 0.089, SWINIR_POLICY)
    payload = json.loads(result.model_dump_json())
    assert payload["triple"] == {"nc": 24, "nl": 4, "nb": 3}
    assert payload["teacher"] == {"nc": 60, "nl": 6, "nb": 4}
    assert payload["policy"] == {
        "nb_rounding": "paper-compat",
        "channel_multiple": None,
        "root": "sqrt",
        "heads": 6,
    }
    assert set(payload) >= {"d", "r", "raw_l", "raw_b", "raw_c", "clamps", "nb_rounding_used"}
    restored = RuleResult.model_validate_json(result.model_dump_json())
    assert restored == result and isinstance(restored.triple, Triple)


# ---- target mode ---------------------------------------------------------------------------------------


def brute_force_largest_feasible(
    teacher: Triple, policy: RoundingPolicy, cost: Callable[[Triple], float], budget: float
) -> float:
    grid = np.linspace(0.0, 1.0, 20_001)
    feasible = [float(d) for d in grid if cost(compact_triple(teacher, float(d), policy).triple) <= budget]
    return max(feasible)


def assert_is_the_largest_fitting_d(
    teacher: Triple, policy: RoundingPolicy, cost: Callable[[Triple], float], budget: float
) -> BudgetResult:
    found = fit_to_budget(teacher, policy, cost, budget)
    print(
        f"budget {budget:,.0f}: d = {found.d:.7f}, {tuple(found.triple)} costs {found.cost:,.0f} "
        f"({found.segments} depth segments, {found.cost_evaluations} cost evaluations)"
    )
    assert found.cost <= budget and cost(found.triple) == found.cost
    assert found.triple == compact_triple(teacher, found.d, policy).triple == found.rule.triple
    if found.d < 1.0:
        assert cost(compact_triple(teacher, min(1.0, found.d + 1e-5), policy).triple) > budget
        assert found.d + 1e-6 >= brute_force_largest_feasible(teacher, policy, cost, budget)
    json.loads(found.model_dump_json())
    return found


@pytest.mark.parametrize("budget", [5_000, 49_603, 100_000, 300_000, 1_000_000])
def test_fit_to_budget_edsr_param_count(budget: float) -> None:
    found = assert_is_the_largest_fitting_d(EDSR_BASELINE, RoundingPolicy(), edsr_params, budget)
    if budget == 49_603:
        # Exactly EDSRmini's count, and (16, 1, 8) fits; but the largest d that fits lies past the mini's
        # range, where N̂_b = 9 makes eq. (7) narrower: (15, 1, 9) at 47,748. Target mode maximises d.
        assert found.triple == (15, 1, 9) and found.d > EDSR_HIGH


@pytest.mark.parametrize("policy", [SWINIR_POLICY, RoundingPolicy(heads=6, nb_rounding="floor")])
@pytest.mark.parametrize("budget", [20_000, 70_000, 98_868, 400_000, 900_000])
def test_fit_to_budget_swinir_param_count(policy: RoundingPolicy, budget: float) -> None:
    assert_is_the_largest_fitting_d(SWINIR_LW, policy, swinir_params, budget)


def test_fit_to_budget_skips_a_gap_in_a_non_monotone_cost() -> None:
    # Under floor, d just below 7r = 4.5 gives (30, 3, 2) = 81,882 params; just above, (24, 4, 2) =
    # 68,772. With a 70,000 budget the feasible d are split in two; the answer is in the upper part.
    policy = RoundingPolicy(heads=6, nb_rounding="floor")
    below = compact_triple(SWINIR_LW, SWINIR_LOW * (1 - 1e-9), policy).triple
    above = compact_triple(SWINIR_LW, SWINIR_LOW * (1 + 1e-9), policy).triple
    assert (below, swinir_params(below)) == ((30, 3, 2), 81_882)
    assert (above, swinir_params(above)) == ((24, 4, 2), 68_772)
    found = assert_is_the_largest_fitting_d(SWINIR_LW, policy, swinir_params, 70_000)
    assert found.d > SWINIR_LOW


def test_fit_to_budget_edges() -> None:
    whole = fit_to_budget(EDSR_BASELINE, RoundingPolicy(), edsr_params, 2_000_000)
    assert whole.d == 1.0 and whole.triple == EDSR_BASELINE
    assert is_ineffective(whole.d, EDSR_BASELINE, whole.triple)
    with pytest.raises(UserError, match="smallest architecture"):
        fit_to_budget(SWINIR_LW, SWINIR_POLICY, swinir_params, 1_000)  # (6, 1, 1) already costs more
    with pytest.raises(UserError, match="budget"):
        fit_to_budget(EDSR_BASELINE, RoundingPolicy(), edsr_params, -5)
