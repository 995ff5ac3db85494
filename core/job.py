"""The job contract: what a user asks for (`JobParams`, `JobConfig`), the stages a job runs through, and
what it returns (`CompressionReport`). No torch: the API, the worker and the store read these
without loading the training code; core.pipeline runs them and core.report draws them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import UserError, describe_validation_error
from core.formats import DEFAULT_FORMATS, CalibrationMethod, FormatName
from core.models.presets import PRESETS, preset_config
from core.recipe import DistillLoss, Precision, Recipe, RecipeName, StudentInit, resolve_recipe
from core.results import CompressResult, DistillResult, ExportResult, PruneResult, QuantizeResult
from core.schedule import BudgetPlan, LrSchedule

# The stages of a job, in order; each is also the name of the job's state while it runs.
STAGES = ("pruning", "compressing", "distilling", "evaluating", "exporting", "quantizing")
MAX_BUDGET_MINUTES = 7 * 24 * 60


class JobParams(BaseModel):
    """Everything about a job except where its files are. Shared by the CLI, the API and the worker.

    Knobs left as None take the recipe's value (core.recipe); the report records every
    resolved value. Give either a time budget or iteration counts, not both.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    model: str = Field(description="teacher preset (family + architecture), e.g. rlfn_s, edsr_baseline")
    scale: Literal[2, 3, 4]
    recipe: RecipeName = Field("fast", description="fast (best student per minute) or paper (faithful)")
    budget_minutes: float | None = Field(
        None,
        gt=0,
        le=MAX_BUDGET_MINUTES,
        description="wall clock for pruning, teacher labelling and distillation (evaluation and export "
        "follow); turned into iteration counts on the worker and recorded",
    )
    lambda_: float | None = Field(None, gt=0, alias="lambda", description="ℓ1 strength λ (default 1e-4)")
    target_params: int | None = Field(None, ge=1, le=10**10, description="size budget: student parameters")
    target_gmacs: float | None = Field(
        None, gt=0, le=1e6, description="size budget: student GMACs at the default LR size"
    )
    student: tuple[int, int, int] | None = Field(None, description="override the compact (nc, nl, nb)")
    student_preset: str | None = Field(
        None, description="train this preset as the student (any family, e.g. edsr_mini), not the rule's"
    )
    alpha: float | None = Field(None, ge=0, le=1e3, description="weight of L1(student, ground truth)")
    prune_iters: int | None = Field(None, ge=1, le=10**8)
    distill_iters: int | None = Field(None, ge=1, le=10**9)
    prune_lr: float = Field(5e-3, gt=0, description="OBProx-SG step size")
    distill_lr: float | None = Field(None, gt=0, description="AdaMax learning rate of the student")
    distill_loss: DistillLoss | None = None
    l2_finish: float | None = Field(
        None, ge=0, lt=1, description="the last this fraction of distillation trains on L2 to ground truth"
    )
    lr_schedule: LrSchedule | None = None
    warmup: float | None = Field(None, ge=0, lt=1, description="lr warm-up, fraction of the run")
    precision: Precision | None = Field(
        None, description="training precision (auto: bf16 on GPUs and on CPUs with native bf16)"
    )
    overparam: float | None = Field(
        None,
        ge=0,
        le=8,
        description="train 3×3 convs with expansion branches of this × their inputs, "
        "folded after training (0: off)",
    )
    student_init: StudentInit | None = Field(
        None, description="scratch (the paper) or inherit the pruned teacher's weights"
    )
    holdout_images: int | None = Field(
        None, ge=0, le=1000, description="training images held out to choose the checkpoint"
    )
    rescales: list[Annotated[float, Field(gt=0, lt=1)]] | None = Field(
        None, max_length=4, description="also train on the images downscaled by these factors"
    )
    batch_size: int | None = Field(
        None, ge=1, le=1024, description="training patches per step (default: the recipe's)"
    )
    patch_size: int | None = Field(
        None, ge=16, le=512, description="LR patch side, a multiple of 8 (default: the recipe's)"
    )
    nb_rounding: Literal["nearest", "floor", "paper-compat"] = "paper-compat"
    channel_multiple: int | None = Field(None, ge=1, le=1024)
    teacher_cache: bool = True
    validate_every: int | None = Field(None, ge=0, description="default: the recipe's count per run")
    checkpoint_every: int = Field(100, ge=1)
    formats: list[FormatName] = Field(
        default_factory=lambda: list(DEFAULT_FORMATS),
        max_length=16,
        description="deployable formats to build and verify after export (core.formats)",
    )
    calibration: CalibrationMethod = Field("percentile", description="int8 activation ranges")
    calibration_patches: int = Field(128, ge=1, le=4096, description="LR patches of the training data")
    seed: int = Field(0, ge=0, lt=2**32)
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> JobParams:
        if self.target_params is not None and self.target_gmacs is not None:
            raise ValueError("give at most one of target_params and target_gmacs")
        if self.patch_size is not None and self.patch_size % 8:
            raise ValueError(
                f"patch_size must be a multiple of 8 (HR patches feed a 5-level pyramid), "
                f"got {self.patch_size}"
            )
        if self.budget_minutes is not None and (self.prune_iters or self.distill_iters):
            raise ValueError(
                "give either budget_minutes or iteration counts (prune_iters, distill_iters), not both"
            )
        if self.model not in PRESETS:
            raise ValueError(f"unknown preset {self.model!r}; choose one of: {', '.join(PRESETS)}")
        if self.student is not None:
            if min(self.student) < 1:
                raise ValueError(f"student (nc, nl, nb) must be positive, got {self.student}")
            try:  # e.g. a SwinIR width that is not a multiple of its attention heads
                preset_config(self.model, self.scale).with_triple(*self.student)
            except (UserError, ValidationError) as error:
                why = (
                    describe_validation_error(error.errors()) if isinstance(error, ValidationError) else error
                )
                raise ValueError(f"student {self.student} does not fit {self.model}: {why}") from None
        if self.student_preset is not None:
            if self.student_preset not in PRESETS:
                raise ValueError(
                    f"unknown student_preset {self.student_preset!r}; choose one of: {', '.join(PRESETS)}"
                )
            if self.student is not None or self.target_params or self.target_gmacs:
                raise ValueError(
                    "student_preset names the student: drop student, target_params and target_gmacs"
                )
            if self.student_init == "inherit" and self.cross_family_student:
                raise ValueError(
                    f"student_init=inherit needs a student of the teacher's family "
                    f"({PRESETS[self.model]['family']}), not {PRESETS[self.student_preset]['family']}"
                )
        student_family = preset_config(self.student_preset or self.model, self.scale)
        refused = [name for name in self.formats if name not in type(student_family).export_formats]
        if refused:
            raise ValueError(
                f"{student_family.family} cannot be exported as {', '.join(refused)}: "
                f"{type(student_family).formats_note}"
            )
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats lists a format twice: {self.formats}")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d{1,2})?", self.device):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu or cuda[:N]")
        return self

    @property
    def cross_family_student(self) -> bool:
        """A student preset of another family than the teacher (it cannot inherit its weights)."""
        return (
            self.student_preset is not None
            and PRESETS[self.student_preset]["family"] != PRESETS[self.model]["family"]
        )

    def resolved_recipe(self) -> Recipe:
        return resolve_recipe(self, cross_family_student=self.cross_family_student)


class JobConfig(JobParams):
    teacher_weights: Path
    train_data: list[Path] = Field(min_length=1)
    val_data: list[Path] = Field(min_length=1)


class DatasetScore(BaseModel):
    dataset: str
    psnr: float
    ssim: float


class ModelSummary(BaseModel):
    config: dict
    params: int
    params_excl_rpb: int
    macs: int
    lr_size: tuple[int, int]
    scores: list[DatasetScore] = []
    latency_ms: float | None = None


class GapRow(BaseModel):
    """One validation set: what bicubic, the teacher and the student reach, and the student's gap."""

    dataset: str
    bicubic: float
    teacher: float
    student: float
    student_minus_teacher: float
    student_minus_bicubic: float
    used_for_selection: bool = Field(description="the held-out training images the checkpoint was chosen on")


class Holdout(BaseModel):
    """The training images held out to choose the checkpoint (never a reported set)."""

    seed: int
    images: list[str]
    training_images: int


class CompressionReport(BaseModel):
    params: JobParams
    recipe: Recipe = Field(description="every value the job ran with (the recipe with the job's overrides)")
    budget: BudgetPlan | None = Field(None, description="how budget_minutes became iteration counts")
    holdout: Holdout
    gaps: list[GapRow] = Field(description="per validation set, student − teacher in dB")
    teacher_source: str
    teacher: ModelSummary
    student: ModelSummary
    bicubic: list[DatasetScore]
    prune: PruneResult
    compress: CompressResult
    distill: DistillResult
    export: ExportResult
    quantize: QuantizeResult | None = Field(None, description="every format asked for, verified")
    pruning_ineffective: bool
    latency_setup: str
    stage_seconds: dict[str, float]
    versions: dict[str, str]
    artifacts: list[str]
