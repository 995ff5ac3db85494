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


class Replan(BaseModel):
    """A budgeted run's length, re-planned at the end of its warm-up from the loop's own step time."""

    at_iteration: int
    step_seconds: float
    iterations: int


class DistillResult(BaseModel):
    iterations: int  # the steps taken
    planned_iterations: int | None = None  # before any re-plan
    replan: Replan | None = None
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


# --- 6 quantize -----------------------------------------------------------------------------------


class FormatResult(BaseModel):
    """One deployable format, verified against the fp32 PyTorch model (or why it is not offered)."""

    name: str
    precision: str
    runtime: str
    file: str = Field(description="the file a runtime is pointed at")
    files: list[str] = Field(description="every file of the format (e.g. an OpenVINO .xml and its .bin)")
    ok: bool = Field(description="converted, ran and met its floor: offered for download and serving")
    reason: str = ""
    bytes: int = 0
    parity_db: float | None = Field(None, description="PSNR of this format's output against fp32's")
    quality_cost_db: float | None = Field(None, description="fp32's PSNR-Y against HR minus this format's")
    psnr: float | None = Field(None, description="PSNR-Y against HR on the verification images")
    ssim: float | None = None
    latency_ms: float | None = Field(None, description="median CPU latency at the stated LR size, batch 1")
    seconds: float = Field(0.0, description="time to convert and verify")


class Calibration(BaseModel):
    """How int8 activation ranges were found (recorded with every int8 format)."""

    method: str
    patches: int
    patch_size: int
    seed: int
    source: list[str] = Field(description="the image folders the LR patches were drawn from")


class QuantizeResult(BaseModel):
    formats: list[FormatResult]
    calibration: Calibration | None
    verification_set: str
    fp32_psnr: float
    fp32_ssim: float
    latency_lr_size: tuple[int, int]
    latency_setup: str
