"""What each stage of a job returns: typed results, recorded in the job's state and report.

No torch here (core.job and the service read these without loading the training code).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from core.compress.rule import BudgetResult, RuleResult, Triple

# --- 1 prune --------------------------------------------------------------------------------------


class DensityPoint(BaseModel):
    iteration: int
    charbonnier: float
    l1_norm: float
    density: float
    phase: str


class PruneResult(BaseModel):
    density: float = Field(description="non-zero / all entries of the deep-feature weights (method.md §3.3)")
    counted_weights: int
    nonzero_weights: int
    per_layer_density: dict[str, float]
    curve: list[DensityPoint]
    iterations: int
    epoch_size: int = Field(description="optimizer steps per epoch")
    n_prox_epochs: int
    final_phase: str
    lambda_: float
    seconds: float


# --- 2 compress -----------------------------------------------------------------------------------


class Complexity(BaseModel):
    params: int
    params_excl_rpb: int
    macs: int
    lr_size: tuple[int, int]


class CompressResult(BaseModel):
    pruned_density: float
    rule: RuleResult = Field(description="the rule applied to the pruned d")
    budget: BudgetResult | None = Field(None, description="target mode: the d that fits the budget")
    override: Triple | None = None
    chosen: Triple
    student_config: dict
    teacher: Complexity
    student: Complexity
    pruning_ineffective: bool
    note: str


# --- 3 distill ------------------------------------------------------------------------------------


class ValPoint(BaseModel):
    iteration: int
    psnr: float
    ssim: float
    seconds: float = Field(0.0, description="the stage's wall clock at this validation")


class LossPoint(BaseModel):
    iteration: int
    total: float
    l1: float
    teacher: float = 0.0
    teacher_hf: float = 0.0


class DistillResult(BaseModel):
    iterations: int
    stopped_early: bool
    best_iteration: int
    best_psnr: float
    validation_set: str
    val_curve: list[ValPoint]
    loss_curve: list[LossPoint]
    seconds: float
    teacher_cache_seconds: float
    iterations_per_second: float
    lr_milestones: list[int]
    loss: str = "paper"
    schedule: str = "step"
    ema_decay: float = 0.999
    precision: str = "fp32"
    precision_reason: str = ""


# --- 5 export -------------------------------------------------------------------------------------


class ExportResult(BaseModel):
    weights: str
    config: str
    onnx: str
    onnx_dynamic_shapes: bool
    onnx_lr_size: tuple[int, int]
    onnx_opset: int
    onnx_max_abs_diff: float
