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
import statistics
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from core.compress.stage import CompressConfig, CompressResult, run_compress
from core.data.datasets import TrainImages, find_pairs
from core.distill.inherit import inherit_weights
from core.distill.stage import DistillConfig, DistillResult, run_distill
from core.errors import UserError
from core.evaluate import evaluate_dataset
from core.export import ExportResult, export_model
from core.models import build_model, load_checkpoint, load_model, parse_config, preset_config, save_model
from core.prune.stage import PruneConfig, PruneResult, run_prune
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
log = logging.getLogger("srcompress.pipeline")


class JobParams(BaseModel):
    """Everything about a job except where its files are. Shared by the CLI, the API and the worker."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str = Field(description="teacher preset (family + architecture), e.g. rlfn_s, edsr_baseline")
    scale: Literal[2, 3, 4]
    lambda_: float | None = Field(None, gt=0, alias="lambda", description="ℓ1 strength λ (default 1e-4)")
    target_params: int | None = Field(None, ge=1, description="size budget: student parameters")
    target_gmacs: float | None = Field(
        None, gt=0, description="size budget: student GMACs at the default LR size"
    )
    alpha: float = Field(0.1, ge=0, description="weight of L1(student, ground truth)")
    prune_iters: int = Field(500, ge=1)
    distill_iters: int = Field(2000, ge=1)
    prune_lr: float = Field(5e-3, gt=0, description="OBProx-SG step size")
    distill_lr: float = Field(1e-4, gt=0, description="AdaMax learning rate of the student")
    batch_size: int = Field(16, ge=1)
    patch_size: int = Field(48, ge=16, description="LR patch size (HR = patch × scale); multiple of 8")
    nb_rounding: Literal["nearest", "floor", "paper-compat"] = "paper-compat"
    channel_multiple: int | None = Field(None, ge=1)
    student: tuple[int, int, int] | None = Field(None, description="override the compact (nc, nl, nb)")
    student_init: Literal["scratch", "inherit"] = Field(
        "scratch", description="scratch (the paper) or inherit the pruned teacher's weights"
    )
    teacher_cache: bool = True
    validate_every: int = Field(500, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0
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
        return self


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


class CompressionReport(BaseModel):
    params: JobParams
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
    """workdir/state.json: the typed result of each finished stage, and its wall-clock seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"results": {}, "seconds": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["results"]

    def get(self, stage: str) -> dict:
        return self.data["results"][stage]

    def put(self, stage: str, result: BaseModel | dict, seconds: float) -> None:
        self.data["results"][stage] = (
            result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        )
        self.data["seconds"][stage] = seconds
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


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
    from core.report import crop_comparison_png, psnr_params_png, write_card

    workdir = Path(workdir)
    device = resolve_device(config.device)
    teacher, _ = validate_inputs(config)  # before anything is written
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher.to(device).eval()
    handler = _attach_log(out)
    state = _State(workdir / "state.json")
    log.info("job %s on %s", config.model_dump_json(by_alias=True), device)
    try:
        seed_everything(config.seed)
        train = TrainImages.from_folders(
            config.train_data,
            config.scale,
            lr_patch=config.patch_size,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        log.info("training images: %d (%d too small: %s)", len(train), len(train.skipped), train.skipped)

        # 1 prune
        if not state.done("pruning"):
            began = time.perf_counter()
            prune_config = PruneConfig(
                iterations=config.prune_iters,
                lr=config.prune_lr,
                lambda_=config.lambda_ if config.lambda_ is not None else 1e-4,
                checkpoint_every=config.checkpoint_every,
            )
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
                ),
            )
            state.put("compressing", compress, time.perf_counter() - began)
            log.info(compress.note)
        compress = CompressResult(**state.get("compressing"))
        on_progress("compressing", 1.0, {"student": list(compress.chosen), "params": compress.student.params})

        # 3 distill
        student_dir = workdir / "student"
        if not state.done("distilling"):
            began = time.perf_counter()
            torch.manual_seed(config.seed)  # the student's init depends on the seed only
            student = build_model(parse_config(compress.student_config))
            if config.student_init == "inherit":
                pruned = copy.deepcopy(teacher)
                pruned.load_state_dict(load_checkpoint_state(workdir / "prune.pt")["model"])
                inherited = inherit_weights(student, pruned)
                log.info("student inherits the pruned teacher's weights: %s", inherited)
            distill_config = DistillConfig(
                iterations=config.distill_iters,
                lr=config.distill_lr,
                alpha=config.alpha,
                teacher_cache=config.teacher_cache,
                validate_every=config.validate_every,
                checkpoint_every=config.checkpoint_every,
            )
            student, distill = run_distill(
                student,
                teacher,
                train,
                config.val_data[0],
                distill_config,
                workdir,
                device,
                on_progress,
                should_cancel,
            )
            save_model(student, student_dir)
            state.put("distilling", distill, time.perf_counter() - began)
        distill = DistillResult(**state.get("distilling"))
        student = load_model(student_dir).to(device).eval()

        # 4 evaluate
        if not state.done("evaluating"):
            began = time.perf_counter()
            scores: dict[str, list[dict]] = {"teacher": [], "student": [], "bicubic": []}
            from core.evaluate import evaluate_model

            for i, folder in enumerate(config.val_data):
                for name, model in (("teacher", teacher), ("student", student)):
                    result = evaluate_dataset(model, folder, config.scale, device=device)
                    scores[name].append(
                        DatasetScore(dataset=result.dataset, psnr=result.psnr, ssim=result.ssim).model_dump()
                    )
                bicubic = evaluate_model("bicubic", config.scale, None, folder)
                scores["bicubic"].append(
                    DatasetScore(dataset=bicubic.dataset, psnr=bicubic.psnr, ssim=bicubic.ssim).model_dump()
                )
                on_progress("evaluating", (i + 1) / len(config.val_data), {"dataset": bicubic.dataset})
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

        report = CompressionReport(
            params=JobParams(**config.model_dump(include=set(JobParams.model_fields))),
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
