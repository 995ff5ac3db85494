"""Schedules as fractions of a run, and a time budget turned into iteration counts.

Every schedule of a training run is stated as a fraction of its iteration count — lr warm-up and decay,
EMA horizon, validation cadence — so that a run of any length, 300 iterations or 800k, ends with a
finished schedule. A time budget is turned into iteration counts from step times measured on this
machine, and recorded: the schedule is then exact and a resumed run repeats it bit for bit. The
distillation count is planned from seconds of steps before training and re-planned once, from the
loop's own steps, at the end of its lr warm-up (before any decay depends on it).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field

LrSchedule = Literal["step", "cosine", "linear"]


def warmup_steps(warmup: float, total: int) -> int:
    """The lr warm-up of a `total`-step run: its first ⌈warmup·total⌉ steps."""
    return math.ceil(warmup * total) if warmup > 0 else 0


def lr_factor(
    step: int,
    total: int,
    schedule: LrSchedule,
    warm: int = 0,
    milestones: tuple[int, ...] = (),
) -> float:
    """The lr multiplier of optimizer step `step` (1-based) of `total`.

    Linear warm-up over the first `warm` steps (reaching 1 at the last warm-up step), then: `step`:
    ×0.5 at each milestone (the paper's recipe); `cosine` / `linear`: decay from 1 to exactly 0 at the
    last step. The warm-up is a step count rather than a fraction so that a run re-planned at its end
    (a budgeted run, see core.distill.stage) keeps the steps it already took.
    """
    if step <= warm:
        return step / warm
    if schedule == "step":
        return 0.5 ** sum(step > m for m in milestones)
    progress = min(1.0, (step - warm) / max(total - warm, 1))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def ema_decay_for(total: int, decay: float, horizon: float | None) -> float:
    """The EMA decay of a run: `decay`, shortened so that the average spans at most `horizon`·total
    steps (a 0.999 average over a 300-step run would still be mostly the first steps' weights)."""
    if horizon is None:
        return decay
    return min(decay, 1.0 - 1.0 / max(2.0, horizon * total))


def validate_every_for(total: int, validations: int) -> int:
    """Validate `validations` times over the run (and at its end); 0 means only at the end."""
    return 0 if validations <= 0 else max(1, math.ceil(total / validations))


def run_length(
    seconds: float, step_seconds: float, done: int = 0, finish_share: float = 0.0, finish_ratio: float = 1.0
) -> int:
    """The length N of a run whose steps after its first `done` fit in `seconds` (at least `done` + 1: a
    budget always trains), when its last `finish_share`·N steps (the L2 finish) cost `finish_ratio` of
    the others' `step_seconds`: (N − done − f·N + f·r·N)·t = seconds, for a `done` before the finish."""
    steps = max(seconds, 0.0) / max(step_seconds, 1e-9) + done
    return max(done + 1, math.floor(steps / (1.0 - finish_share * (1.0 - finish_ratio))))


class StepCost(NamedTuple):
    """A distillation step's measured seconds, and what an L2-finish step costs relative to it (no
    teacher target and no high-frequency pyramid: 0.91–0.95 on a 2-core EPYC, bench/RESULTS.md)."""

    seconds: float
    finish_ratio: float = 1.0


class BudgetPlan(BaseModel):
    """How a job's time budget became iteration counts (measured on the worker that planned it)."""

    budget_seconds: float
    prune_share: float
    prune_step_seconds: float
    prune_iters: int
    spent_before_distill_seconds: float = 0.0  # pruning, teacher labelling and the measurements
    distill_step_seconds: float = 0.0
    finish_step_ratio: float = 1.0  # an L2-finish step's cost over distill_step_seconds
    validation_seconds: float = 0.0  # one validation of the student
    validations: int = 0
    distill_iters: int = 0
    labelled_images: int | None = Field(
        None, description="training images the teacher labelled within its share (the rest: ground truth)"
    )

    @property
    def distill_seconds(self) -> float:
        """Distillation's deadline: what the budget leaves after the work before it (at least 1 s)."""
        return max(self.budget_seconds - self.spent_before_distill_seconds, 1.0)

    def plan_distill(
        self,
        spent_seconds: float,
        step_cost: StepCost,
        finish_share: float,
        validation_seconds: float,
        validations: int,
        labelled_images: int | None = None,
    ) -> BudgetPlan:
        """The rest of the budget after pruning and labelling, as distillation iterations (the last
        `finish_share` of them priced at the finish step's cost)."""
        left = self.budget_seconds - spent_seconds - validations * validation_seconds
        return self.model_copy(
            update={
                "spent_before_distill_seconds": spent_seconds,
                "distill_step_seconds": step_cost.seconds,
                "finish_step_ratio": step_cost.finish_ratio,
                "validation_seconds": validation_seconds,
                "validations": validations,
                "distill_iters": run_length(left, step_cost.seconds, 0, finish_share, step_cost.finish_ratio),
                "labelled_images": labelled_images,
            }
        )


def plan_pruning(budget_seconds: float, share: float, step_seconds: float) -> BudgetPlan:
    """The first half of a plan: the pruning share of the budget, as OBProx-SG steps."""
    return BudgetPlan(
        budget_seconds=budget_seconds,
        prune_share=share,
        prune_step_seconds=step_seconds,
        prune_iters=run_length(share * budget_seconds, step_seconds),
    )
