"""Recipes: the named sets of defaults a job's pruning and distillation start from.

- `paper` reproduces Jiang et al. 2024 faithfully (method.md §5): a student trained from scratch with
  AdaMax at 1e-4, α·L1 + the Laplacian KD loss, lr halved at the family's milestones, EMA 0.999. It
  needs the paper's 800k iterations to get where the paper got.
- `fast` (the default) is what measured best per minute on a CPU (bench/recipes.py, bench/RESULTS.md):
  the student inherits the pruned teacher's weights and trains with AdaMax at 2e-3 under a cosine
  decay to zero after a short warm-up. Its loss depends on the time budget. Below 30 minutes it is L1
  to the ground truth: the best teacher-driven loss (`pixel_hf`: the teacher's output and its high
  frequencies as targets, plus α·L1 to the ground truth) lost at 8 minutes and tied at 20 on the
  held-out images — it pays for labelling the images and for a 10% dearer step. From 30 minutes on it
  is `pixel_hf`, whose per-step lead then outweighs its costs (+0.06 dB on held-out images at 40 minutes),
  and the student trains over-parameterized (core.models.overparam: every 3×3 conv with a 1×1 and a
  1×1→3×3 expansion branch, folded into the plain conv after training): +0.06 dB held-out at 55
  minutes and +0.08 dB at 30, ahead at every validation from 10% of the run on although a step costs
  ~17% more. Shorter budgets are unmeasured and keep plain training.
  From 60 minutes on, when the ≤ 45k-param student has stopped gaining from more iterations (the
  held-out curves of 120-minute runs flatten after half of the run), it trains on LR patches of 64
  instead of 48 (its attention's pooled map sees 9x9 cells instead of 6x6, and a step costs only ~10%
  more) and ends on L2 to the ground truth over the last quarter: at 120 minutes this reached 34.49 dB
  on the held-out images against 34.43 and 34.44 for the two earlier 120-minute runs without it.

Every knob stays overridable from the job; `resolve_recipe` applies the job's overrides and the result
(every value, and which ones the job set) is recorded in the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schedule import LrSchedule

if TYPE_CHECKING:
    from core.job import JobParams

RecipeName = Literal["paper", "fast"]
StudentInit = Literal["scratch", "inherit"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# The distillation losses of core.losses: the paper's, and the variants bench/recipes.py compares.
DistillLoss = Literal["paper", "laplacian_flat", "pixel_hf", "l1_gt", "l2_gt", "l1_teacher", "blend"]
DISTILL_LOSSES: tuple[str, ...] = get_args(DistillLoss)
GROUND_TRUTH_LOSSES = ("l1_gt", "l2_gt")


def loss_needs_teacher(loss: str) -> bool:
    """Every loss but plain L1 or L2 to the ground truth has the teacher's output as a target."""
    return loss not in GROUND_TRUTH_LOSSES


class BudgetTier(BaseModel):
    """Recipe values that change from a time budget of `minutes` on (a job's own overrides still win)."""

    model_config = ConfigDict(extra="forbid")

    minutes: float
    changes: dict[str, Any]


class Recipe(BaseModel):
    """Every value a job's training stages run with."""

    model_config = ConfigDict(extra="forbid")

    name: RecipeName
    student_init: StudentInit
    loss: DistillLoss
    budget_tiers: list[BudgetTier] = Field(
        default_factory=list, description="what changes on longer time budgets (ascending)"
    )
    alpha: float = Field(description="weight of L1(student, ground truth) in paper / pixel_hf")
    l2_finish: float = Field(
        0.0,
        description="the last this fraction of the distillation iterations train on L2 to the "
        "ground truth (PSNR's own loss) instead of `loss`",
    )
    lr: float
    schedule: LrSchedule
    warmup: float = Field(description="lr warm-up, fraction of the distillation iterations")
    lr_milestones: list[float] | None = Field(
        None, description="`step` schedule: ×0.5 at these fractions of the run; None = family default"
    )
    ema_decay: float
    ema_horizon: float | None = Field(
        description="the EMA spans at most this fraction of the run (None: the decay as given)"
    )
    precision: Precision
    overparam: float = Field(
        0.0,
        description="train the student's 3×3 convs over-parameterized (a 1×1 and a 1×1→3×3 expansion "
        "of this × their inputs beside each, core.models.overparam), folded after training; 0: off",
    )
    batch_size: int = Field(16, description="training patches per step")
    patch_size: int = Field(48, description="LR patch side (HR = patch × scale)")
    prune_share: float = Field(description="share of a time budget spent pruning")
    labelling_share: float | None = Field(
        description="at most this share of a time budget labels images with the teacher (the rest of "
        "the images keep their ground truth as the target); None: label every image"
    )
    prune_iters: int = Field(description="without a time budget")
    distill_iters: int = Field(description="without a time budget")
    validations: int = Field(description="validations per distillation run (and one at its end)")
    holdout_images: int = Field(description="at most this many training images held out for selection")
    rescales: list[float] = Field(
        default_factory=list, description="training images are also used downscaled by these factors"
    )
    overridden: list[str] = Field(default_factory=list, description="values the job set itself")

    @model_validator(mode="after")
    def _tiers_change_recipe_values(self) -> Recipe:
        for tier in self.budget_tiers:
            if unknown := set(tier.changes) - set(type(self).model_fields):
                raise ValueError(f"the {tier.minutes}-minute tier changes unknown values {sorted(unknown)}")
        return self


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper",
        student_init="scratch",
        loss="paper",
        alpha=0.1,
        lr=1e-4,
        schedule="step",
        warmup=0.0,
        ema_decay=0.999,
        ema_horizon=None,
        precision="fp32",
        prune_share=1 / 9,  # the authors: 100k pruning iterations for 800k of distillation
        labelling_share=None,
        prune_iters=500,
        distill_iters=2000,
        validations=4,
        holdout_images=8,
    ),
    "fast": Recipe(
        name="fast",
        student_init="inherit",
        loss="l1_gt",
        budget_tiers=[
            BudgetTier(minutes=30.0, changes={"loss": "pixel_hf", "overparam": 2.0}),
            BudgetTier(minutes=60.0, changes={"patch_size": 64, "l2_finish": 0.25}),
        ],
        alpha=0.1,
        lr=2e-3,
        schedule="cosine",
        warmup=0.02,
        ema_decay=0.999,
        ema_horizon=0.1,
        precision="auto",
        prune_share=0.05,
        labelling_share=0.15,
        prune_iters=100,
        distill_iters=2000,
        validations=10,
        holdout_images=8,
    ),
}

# JobParams field -> Recipe field, for the knobs a job may override.
OVERRIDES = {
    "student_init": "student_init",
    "distill_loss": "loss",
    "l2_finish": "l2_finish",
    "alpha": "alpha",
    "distill_lr": "lr",
    "lr_schedule": "schedule",
    "warmup": "warmup",
    "precision": "precision",
    "overparam": "overparam",
    "batch_size": "batch_size",
    "patch_size": "patch_size",
    "prune_iters": "prune_iters",
    "distill_iters": "distill_iters",
    "holdout_images": "holdout_images",
    "rescales": "rescales",
}


def resolve_recipe(params: JobParams, cross_family_student: bool = False) -> Recipe:
    """The job's recipe with its overrides applied over the tiers its time budget reaches. A
    student of another family than the teacher cannot inherit its weights: it starts from scratch
    unless the job asked for inherit (an error the job's own validation reports)."""
    base = RECIPES[params.recipe]
    changes = {
        field: getattr(params, job_field)
        for job_field, field in OVERRIDES.items()
        if getattr(params, job_field) is not None
    }
    overridden = sorted(changes)
    tiered: dict[str, Any] = {}
    for tier in base.budget_tiers:  # ascending: a longer budget's tier wins over a shorter one's
        if (params.budget_minutes or 0.0) >= tier.minutes:
            tiered.update(tier.changes)
    changes = {**tiered, **changes}
    if cross_family_student and "student_init" not in changes:
        changes["student_init"] = "scratch"
    return base.model_copy(update={**changes, "overridden": overridden})
