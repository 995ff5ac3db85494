"""Stage 2 as a job stage: teacher config + density (or a size budget) → the compact student config.

Not index surgery: the student is a fresh architecture built from a config (method.md §1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.complexity import config_complexity
from core.compress.rule import (
    INEFFECTIVE_DENSITY,
    RoundingPolicy,
    Triple,
    compact_triple,
    fit_to_budget,
    is_ineffective,
)
from core.errors import UserError
from core.models.config import ModelConfig
from core.models.presets import preset_config
from core.results import Complexity, CompressResult


class CompressConfig(BaseModel):
    """How d becomes a config. Give at most one of target_params / target_gmacs (a size budget)."""

    model_config = ConfigDict(extra="forbid")

    nb_rounding: Literal["nearest", "floor", "paper-compat"] = "paper-compat"
    channel_multiple: int | None = Field(None, ge=1, description="round the width to a multiple (e.g. 8)")
    target_params: int | None = Field(None, ge=1, description="parameter budget for the student")
    target_gmacs: float | None = Field(None, gt=0, description="MAC budget (G) at the default LR size")
    student: tuple[int, int, int] | None = Field(None, description="override: (nc, nl, nb) used as is")
    student_preset: str | None = Field(None, description="override: this preset (any family) is the student")


def run_compress(teacher_config: ModelConfig, density: float, config: CompressConfig) -> CompressResult:
    if config.target_params is not None and config.target_gmacs is not None:
        raise UserError("give at most one of target_params and target_gmacs")
    teacher_triple = Triple(*teacher_config.triple)
    heads = teacher_config.heads if teacher_config.family == "swinir" else None
    policy = RoundingPolicy(
        nb_rounding=config.nb_rounding, channel_multiple=config.channel_multiple, heads=heads
    )
    rule = compact_triple(teacher_triple, density, policy)
    budget = None
    if config.target_params is not None or config.target_gmacs is not None:
        cost_cache: dict[Triple, Complexity] = {}

        def cost(triple: Triple) -> float:
            if triple not in cost_cache:
                cost_cache[triple] = config_complexity(teacher_config.with_triple(*triple))
            c = cost_cache[triple]
            return c.params if config.target_params is not None else c.macs / 1e9

        limit = config.target_params if config.target_params is not None else config.target_gmacs
        budget = fit_to_budget(teacher_triple, policy, cost, float(limit))

    if config.student_preset is not None:
        student_config = preset_config(config.student_preset, teacher_config.scale)
        chosen, how = Triple(*student_config.triple), f"the preset {config.student_preset}"
    elif config.student is not None:
        chosen, how = Triple(*config.student), "the user's override"
    elif budget is not None:
        chosen, how = budget.triple, f"the size budget (d = {budget.d:.6f})"
    else:
        chosen, how = rule.triple, f"the pruned density (d = {density:.6f})"
    if config.student_preset is None:
        student_config = teacher_config.with_triple(*chosen)
    ineffective = is_ineffective(density, teacher_triple, rule.triple)
    note = f"student {tuple(chosen)} (nc, nl, nb) from {how}."
    if ineffective:
        note += (
            f" pruning_ineffective: the pruned density {density:.4f} "
            + (
                f"is above {INEFFECTIVE_DENSITY}"
                if density > INEFFECTIVE_DENSITY
                else "gives the teacher's own config"
            )
            + "; on a short pruning budget λ barely acts (method.md §3.2) — "
            "use a size target or more iterations."
        )
    return CompressResult(
        pruned_density=density,
        rule=rule,
        budget=budget,
        override=Triple(*config.student) if config.student else None,
        chosen=chosen,
        student_config=student_config.model_dump(),
        teacher=config_complexity(teacher_config),
        student=config_complexity(student_config),
        pruning_ineffective=ineffective,
        note=note,
    )
