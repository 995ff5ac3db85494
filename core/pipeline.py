"""The whole compression job: prune → compress → distill → evaluate → export, resumable from `workdir`.

`JobParams` are the knobs a user sets; `JobConfig` adds the file paths (the service's request adds
dataset/model ids in their place). `run_pipeline` returns a `CompressionReport` and leaves every
artifact in `workdir/out/`. Each finished stage writes its typed result into `workdir/state.json`, and
every training stage checkpoints itself, so a killed run continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from core.compress.stage import CompressConfig, CompressResult, run_compress
from core.data.datasets import TrainImages, find_pairs, holdout_split, list_images, load_images
from core.distill.inherit import inherit_weights
from core.distill.recipe import Precision, Recipe, RecipeName, StudentInit, resolve_recipe
from core.distill.schedule import BudgetPlan, LrSchedule, plan_pruning, validate_every_for
from core.distill.stage import (
    DistillConfig,
    DistillResult,
    measure_distill_step,
    run_distill,
    teacher_outputs,
    with_ground_truth,
)
from core.errors import UserError
from core.evaluate import evaluate_dataset
from core.export import ExportResult, export_model
from core.losses import DISTILL_LOSSES, loss_needs_teacher
from core.models import (
    PRESETS,
    build_model,
    describe_validation_error,
    load_checkpoint,
    load_model,
    parse_config,
    preset_config,
    save_model,
)
from core.prune.stage import PruneConfig, PruneResult, measure_prune_step, run_prune
from core.training import (
    CancelFn,
    ProgressFn,
    load_checkpoint_state,
    never_cancel,
    no_progress,
    resolve_device,
    seed_everything,
)

STAGES = ("pruning", "compressing", "distilling", "evaluating", "exporting")
MAX_BUDGET_MINUTES = 7 * 24 * 60
MEASURE_SECONDS, MEASURE_SHARE = 8.0, 0.02  # a budgeted run times its step this long (at most 2%)
log = logging.getLogger("srcompress.pipeline")


class JobParams(BaseModel):
    """Everything about a job except where its files are. Shared by the CLI, the API and the worker.

    Knobs left as None take the recipe's value (core.distill.recipe); the report records every
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
    distill_loss: Literal[DISTILL_LOSSES] | None = None  # type: ignore[valid-type]
    lr_schedule: LrSchedule | None = None
    warmup: float | None = Field(None, ge=0, lt=1, description="lr warm-up, fraction of the run")
    precision: Precision | None = Field(None, description="training precision (auto: bf16 on GPUs)")
    student_init: StudentInit | None = Field(
        None, description="scratch (the paper) or inherit the pruned teacher's weights"
    )
    holdout_images: int | None = Field(
        None, ge=0, le=1000, description="training images held out to choose the checkpoint"
    )
    rescales: list[Annotated[float, Field(gt=0, lt=1)]] | None = Field(
        None, max_length=4, description="also train on the images downscaled by these factors"
    )
    batch_size: int = Field(16, ge=1, le=1024)
    patch_size: int = Field(
        48, ge=16, le=512, description="LR patch size (HR = patch × scale); multiple of 8"
    )
    nb_rounding: Literal["nearest", "floor", "paper-compat"] = "paper-compat"
    channel_multiple: int | None = Field(None, ge=1, le=1024)
    teacher_cache: bool = True
    validate_every: int | None = Field(None, ge=0, description="default: the recipe's count per run")
    checkpoint_every: int = Field(100, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> JobParams:
        if self.target_params is not None and self.target_gmacs is not None:
            raise ValueError("give at most one of target_params and target_gmacs")
        if self.patch_size % 8:
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
                why = describe_validation_error(error) if isinstance(error, ValidationError) else error
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
    pruning_ineffective: bool
    latency_setup: str
    stage_seconds: dict[str, float]
    versions: dict[str, str]
    artifacts: list[str]


# --- resumable state ----------------------------------------------------------------------------------


class _State:
    """workdir/state.json: the typed result of each finished stage, its wall-clock seconds, and the
    job's budget plan (made once, so that a resumed run repeats the same schedule)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"results": {}, "seconds": {}}

    @property
    def plan(self) -> BudgetPlan | None:
        return BudgetPlan(**self.data["plan"]) if "plan" in self.data else None

    @plan.setter
    def plan(self, plan: BudgetPlan) -> None:
        self.data["plan"] = plan.model_dump()
        self._write()

    def done(self, stage: str) -> bool:
        return stage in self.data["results"]

    def get(self, stage: str) -> dict:
        return self.data["results"][stage]

    def put(self, stage: str, result: BaseModel | dict, seconds: float) -> None:
        self.data["results"][stage] = (
            result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        )
        self.data["seconds"][stage] = seconds
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def resume_point(workdir: Path) -> dict[str, str | int]:
    """Where a run in `workdir` continues: its first unfinished stage and that stage's checkpoint
    iteration (0 when the stage has not saved one)."""
    state = _State(Path(workdir) / "state.json")
    stage = next((s for s in STAGES if not state.done(s)), STAGES[-1])
    checkpoint = {"pruning": "prune.pt", "distilling": "distilling.pt"}.get(stage)
    saved = load_checkpoint_state(Path(workdir) / checkpoint) if checkpoint else None
    return {"stage": stage, "iteration": int(saved["iteration"]) if saved else 0}


# --- helpers ------------------------------------------------------------------------------------------


def validate_inputs(config: JobConfig) -> tuple[nn.Module, dict]:
    """Everything that can be checked before any work starts: teacher fits the preset, data exists."""
    preset_config(config.model, config.scale)  # unknown preset → UserError
    teacher, info = load_checkpoint(config.teacher_weights, preset=config.model, scale=config.scale)
    for folder in [*config.train_data, *config.val_data]:
        if not Path(folder).is_dir():
            raise UserError(f"dataset folder not found: {folder}")
    for folder in config.val_data:
        find_pairs(folder, config.scale)  # an empty or unreadable set → UserError
    return teacher, info if isinstance(info, dict) else getattr(info, "model_dump", lambda: {})()


@torch.inference_mode()
def measure_latency(model: nn.Module, device: torch.device, lr_size: tuple[int, int], runs: int = 3) -> float:
    """Median forward time (ms) of one LR image, fp32 eager, after one warm-up run."""
    model = model.eval().to(device)
    x = torch.rand(1, 3, lr_size[1], lr_size[0], device=device)
    times = []
    for i in range(runs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def versions() -> dict[str, str]:
    import numpy
    import onnxruntime

    from core import __version__

    return {
        "srcompress": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def _attach_log(workdir: Path) -> logging.Handler:
    handler = logging.FileHandler(workdir / "pipeline.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


# --- the pipeline -------------------------------------------------------------------------------------


def run_pipeline(
    config: JobConfig,
    workdir: Path,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
) -> CompressionReport:
    """Run (or resume) a job in `workdir`; artifacts land in `workdir/out/`."""
    from core.report import crop_comparison_png, learning_curve_png, psnr_params_png, write_card

    workdir = Path(workdir)
    device = resolve_device(config.device)
    teacher, _ = validate_inputs(config)  # before anything is written
    recipe = config.resolved_recipe()
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher.to(device).eval()
    handler = _attach_log(out)
    state = _State(workdir / "state.json")
    log.info("job %s on %s", config.model_dump_json(by_alias=True), device)
    log.info("recipe %s", recipe.model_dump_json())
    budget_seconds = config.budget_minutes * 60 if config.budget_minutes is not None else None
    try:
        seed_everything(config.seed)
        # The checkpoint is chosen on images held out from the training set, never on the sets the
        # job reports (config.val_data), so that the reported figures are not selected on.
        paths = [p for folder in config.train_data for p in list_images(folder)]
        train_paths, holdout_paths = holdout_split(paths, recipe.holdout_images, config.seed)
        train = TrainImages(
            train_paths,
            config.scale,
            lr_patch=config.patch_size,
            batch_size=config.batch_size,
            seed=config.seed,
            rescales=recipe.rescales,
        )
        holdout = load_images(holdout_paths, config.scale)
        log.info(
            "training images: %d (%d too small: %s); held out for selection: %s",
            len(train), len(train.skipped), train.skipped, [p.name for p in holdout_paths],
        )  # fmt: skip

        # 1 prune
        prune_config = PruneConfig(
            iterations=recipe.prune_iters,
            lr=config.prune_lr,
            lambda_=config.lambda_ if config.lambda_ is not None else 1e-4,
            checkpoint_every=config.checkpoint_every,
        )
        if budget_seconds is not None and state.plan is None:
            step = measure_prune_step(teacher, train, prune_config, device)
            state.plan = plan_pruning(budget_seconds, recipe.prune_share, step)
            log.info("budget plan (pruning): %s", state.plan.model_dump_json())
        if state.plan is not None:
            prune_config = prune_config.model_copy(update={"iterations": state.plan.prune_iters})
        if not state.done("pruning"):
            began = time.perf_counter()
            _, prune = run_prune(teacher, train, prune_config, workdir, device, on_progress, should_cancel)
            state.put("pruning", prune, time.perf_counter() - began)
            log.info("pruned: d = %.6f after %d steps", prune.density, prune.iterations)
        prune = PruneResult(**state.get("pruning"))
        on_progress("pruning", 1.0, {"density": prune.density})

        # 2 compress
        if not state.done("compressing"):
            began = time.perf_counter()
            compress = run_compress(
                teacher.config,
                prune.density,
                CompressConfig(
                    nb_rounding=config.nb_rounding,
                    channel_multiple=config.channel_multiple,
                    target_params=config.target_params,
                    target_gmacs=config.target_gmacs,
                    student=config.student,
                    student_preset=config.student_preset,
                ),
            )
            state.put("compressing", compress, time.perf_counter() - began)
            log.info(compress.note)
        compress = CompressResult(**state.get("compressing"))
        on_progress("compressing", 1.0, {"student": list(compress.chosen), "params": compress.student.params})

        # 3 distill (teacher labelling, then the budget's iteration count, then training)
        student_dir = workdir / "student"
        if not state.done("distilling"):
            began = time.perf_counter()
            torch.manual_seed(config.seed)  # the student's init depends on the seed only
            student = build_model(parse_config(compress.student_config))
            if recipe.student_init == "inherit":
                pruned = copy.deepcopy(teacher)
                pruned.load_state_dict(load_checkpoint_state(workdir / "prune.pt")["model"])
                inherited = inherit_weights(student, pruned)
                log.info("student inherits the pruned teacher's weights: %s", inherited)
            distill_config = DistillConfig(
                iterations=recipe.distill_iters,
                loss=recipe.loss,
                alpha=recipe.alpha,
                lr=recipe.lr,
                schedule=recipe.schedule,
                warmup=recipe.warmup,
                lr_milestones=recipe.lr_milestones,
                ema_decay=recipe.ema_decay,
                ema_horizon=recipe.ema_horizon,
                precision=recipe.precision,
                teacher_cache=config.teacher_cache,
                checkpoint_every=config.checkpoint_every,
            )
            targets, labelled = None, None
            plan = state.plan
            if config.teacher_cache and loss_needs_teacher(recipe.loss):
                # Under a budget the teacher labels images (in a seeded order) for at most its share
                # of the budget; a resumed run labels the same ones, as recorded in the plan.
                on_progress("distilling", 0.0, {"phase": "teacher labelling"})
                order = np.random.default_rng([config.seed, 11]).permutation(len(train)).tolist()
                if plan is not None and plan.labelled_images is not None:
                    outputs = teacher_outputs(teacher, train, device, order[: plan.labelled_images])
                else:
                    share = recipe.labelling_share if plan is not None else None
                    seconds = share * plan.budget_seconds if share is not None else None
                    outputs = teacher_outputs(teacher, train, device, order, seconds)
                labelled = sum(out is not None for out in outputs)
                log.info("teacher labelled %d of %d training images", labelled, len(train))
                targets = with_ground_truth(train, outputs)
            validations = recipe.validations if holdout else 0
            if plan is not None and plan.distill_iters == 0:
                # Seconds of steps, not a handful: a dozen steps read 3-14% fast against the run.
                step_seconds = measure_distill_step(
                    student, teacher, train, targets, distill_config, device,
                    min_seconds=min(MEASURE_SECONDS, MEASURE_SHARE * plan.budget_seconds),
                )  # fmt: skip
                state.plan = plan = plan.plan_distill(
                    spent_seconds=sum(state.data["seconds"].values()) + time.perf_counter() - began,
                    step_seconds=step_seconds,
                    validation_seconds=(
                        _seconds(lambda: evaluate_dataset(student, holdout, config.scale, device))
                        if holdout
                        else 0.0
                    ),
                    validations=validations,
                    labelled_images=labelled,
                )
                log.info("budget plan (distillation): %s", plan.model_dump_json())
            iterations = plan.distill_iters if plan is not None else recipe.distill_iters
            validate_every = (
                config.validate_every
                if config.validate_every is not None
                else validate_every_for(iterations, validations)
            )
            distill_config = distill_config.model_copy(
                update={"iterations": iterations, "validate_every": validate_every}
            )
            student, distill = run_distill(
                student,
                teacher,
                train,
                holdout or None,
                distill_config,
                workdir,
                device,
                on_progress,
                should_cancel,
                targets=targets,
                val_name="holdout",
            )
            save_model(student, student_dir)
            state.put("distilling", distill, time.perf_counter() - began)
        distill = DistillResult(**state.get("distilling"))
        student = load_model(student_dir).to(device).eval()

        # 4 evaluate: the held-out images, then every validation set the job names (reported only)
        if not state.done("evaluating"):
            began = time.perf_counter()
            scores: dict[str, list[dict]] = {"teacher": [], "student": [], "bicubic": [], "holdout": []}
            from core.evaluate import evaluate_model

            sets: list[tuple[str, Path | list]] = [("holdout", holdout)] if holdout else []
            sets += [(Path(folder).name, Path(folder)) for folder in config.val_data]
            for i, (name, data) in enumerate(sets):
                row = {}
                for label, model in (("teacher", teacher), ("student", student)):
                    result = evaluate_dataset(model, data, config.scale, device=device, name=name)
                    row[label] = DatasetScore(dataset=name, psnr=result.psnr, ssim=result.ssim).model_dump()
                bicubic = evaluate_model("bicubic", config.scale, None, data)
                row["bicubic"] = DatasetScore(dataset=name, psnr=bicubic.psnr, ssim=bicubic.ssim).model_dump()
                if name == "holdout" and i == 0:
                    scores["holdout"].append(row)
                else:
                    for label, score in row.items():
                        scores[label].append(score)
                on_progress("evaluating", (i + 1) / len(sets), {"dataset": name})
            lr_size = (320, 180)
            scores["latency_ms"] = {
                "teacher": measure_latency(teacher, device, lr_size),
                "student": measure_latency(student, device, lr_size),
                "setup": f"fp32 eager, batch 1, LR {lr_size[0]}x{lr_size[1]}, {device}, "
                f"{torch.get_num_threads()} threads",
            }
            state.put("evaluating", scores, time.perf_counter() - began)
        scores = state.get("evaluating")

        # 5 export
        if not state.done("exporting"):
            began = time.perf_counter()
            on_progress("exporting", 0.0, {})
            export = export_model(student.cpu(), out)
            state.put("exporting", export, time.perf_counter() - began)
        export = ExportResult(**state.get("exporting"))

        gaps = [
            _gap_row(row["bicubic"], row["teacher"], row["student"], selection=True)
            for row in scores["holdout"]
        ] + [
            _gap_row(b, t, st, selection=False)
            for b, t, st in zip(scores["bicubic"], scores["teacher"], scores["student"], strict=True)
        ]
        report = CompressionReport(
            params=JobParams(**config.model_dump(include=set(JobParams.model_fields))),
            recipe=recipe,
            budget=state.plan,
            holdout=Holdout(
                seed=config.seed, images=[p.name for p in holdout_paths], training_images=len(train)
            ),
            gaps=gaps,
            teacher_source=str(config.teacher_weights),
            teacher=ModelSummary(
                config=teacher.config.model_dump(),
                **compress.teacher.model_dump(),
                scores=scores["teacher"],
                latency_ms=scores["latency_ms"]["teacher"],
            ),
            student=ModelSummary(
                config=compress.student_config,
                **compress.student.model_dump(),
                scores=scores["student"],
                latency_ms=scores["latency_ms"]["student"],
            ),
            bicubic=scores["bicubic"],
            prune=prune,
            compress=compress,
            distill=distill,
            export=export,
            pruning_ineffective=compress.pruning_ineffective,
            latency_setup=scores["latency_ms"]["setup"],
            stage_seconds=state.data["seconds"],
            versions=versions(),
            artifacts=[],
        )
        psnr_params_png(report, out / "psnr_vs_params.png")
        learning_curve_png(report, out / "learning_curve.png")
        crop_comparison_png(teacher.cpu(), student.cpu(), config.val_data[0], config.scale, out / "crops.png")
        write_card(report, out / "MODEL_CARD.md")
        report.artifacts = sorted(p.name for p in out.iterdir()) + ["report.json"]
        (out / "report.json").write_text(report.model_dump_json(indent=2, by_alias=True))
        on_progress("exporting", 1.0, {"student_psnr": report.student.scores[0].psnr})
        log.info("done: %s", report.artifacts)
        return report
    finally:
        log.removeHandler(handler)
        handler.close()


def _seconds(work: Callable[[], object]) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def _gap_row(bicubic: dict, teacher: dict, student: dict, selection: bool) -> GapRow:
    return GapRow(
        dataset=student["dataset"],
        bicubic=bicubic["psnr"],
        teacher=teacher["psnr"],
        student=student["psnr"],
        student_minus_teacher=student["psnr"] - teacher["psnr"],
        student_minus_bicubic=student["psnr"] - bicubic["psnr"],
        used_for_selection=selection,
    )
