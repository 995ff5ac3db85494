"""Human-facing artifacts of a job: PSNR-vs-params plot, crop comparison, model card."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from core.data.datasets import bicubic_upscale, find_pairs, load_pair  # noqa: E402
from core.evaluate import model_upscaler  # noqa: E402

if TYPE_CHECKING:
    from core.job import CompressionReport

# Paper Table I (×2, Set5 PSNR-Y; #Ps in millions as printed — conventions differ, method.md §8).
TABLE_I = {
    "SRCNN": (0.057, 36.66),
    "LapSRN": (0.251, 37.52),
    "CARN": (1.59, 37.76),
    "LatticeNet": (0.756, 38.15),
    "IMDN": (0.694, 38.00),
    "RLFN-S": (0.454, 38.05),
    "FALSR-B": (0.326, 37.61),
    "RT4KSR-XL": (0.092, 36.83),
    "EDSR baseline": (1.37, 37.99),
    "EDSRmini": (0.049, 37.67),
    "SwinIR LW": (0.878, 38.14),
    "SwinIRmini": (0.099, 37.88),
}


def psnr_params_png(report: CompressionReport, path: Path) -> None:
    """PSNR on the first validation set against parameters, this job's teacher/student beside Table I."""
    dataset = report.student.scores[0].dataset
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, (params_m, psnr) in TABLE_I.items():
        ax.scatter(params_m * 1e3, psnr, color="0.6", s=18)
        ax.annotate(
            name, (params_m * 1e3, psnr), fontsize=7, color="0.4", xytext=(3, 2), textcoords="offset points"
        )
    for label, summary, color in (
        ("teacher", report.teacher, "tab:blue"),
        ("student", report.student, "tab:red"),
    ):
        ax.scatter(
            summary.params / 1e3, summary.scores[0].psnr, color=color, s=40, label=f"this job: {label}"
        )
    ax.axhline(report.bicubic[0].psnr, color="0.8", linestyle="--", linewidth=1, label="bicubic")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (K)")
    ax.set_ylabel(f"PSNR-Y (dB), {dataset} ×{report.params.scale}")
    ax.set_title(
        "Compact model vs. the paper's Table I (grey; Set5 ×2, their own #Ps conventions)", fontsize=9
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def learning_curve_png(report: CompressionReport, path: Path) -> None:
    """Validation PSNR (the held-out training images) against the distillation stage's minutes."""
    curve = report.distill.val_curve
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if curve:
        ax.plot([p.seconds / 60 for p in curve], [p.psnr for p in curve], marker="o", color="tab:red",
                label="student (EMA)")  # fmt: skip
    holdout = next((g for g in report.gaps if g.used_for_selection), None)
    if holdout is not None:
        ax.axhline(holdout.teacher, color="tab:blue", linestyle="--", linewidth=1, label="teacher")
        ax.axhline(holdout.bicubic, color="0.6", linestyle="--", linewidth=1, label="bicubic")
    ax.set_xlabel("distillation wall clock (minutes, teacher labelling included)")
    ax.set_ylabel(f"PSNR-Y (dB), held-out training images ×{report.params.scale}")
    ax.set_title(
        f"Learning curve — recipe {report.recipe.name}, {report.distill.iterations:,} iterations", fontsize=9
    )
    if not curve:
        ax.text(0.5, 0.5, "no held-out images: nothing was validated", ha="center", transform=ax.transAxes)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return np.clip(image[top : top + size, left : left + size], 0, 1)


def crop_comparison_png(
    teacher: nn.Module, student: nn.Module, dataset_dir: Path, scale: int, path: Path
) -> None:
    """bicubic / teacher / student / ground truth on the busiest crop of the first validation image."""
    image = load_pair(find_pairs(dataset_dir, scale)[0], scale)
    hr = image.hr.astype(np.float32) / 255
    outputs = {
        "bicubic": bicubic_upscale(image.lr, scale),
        "teacher": model_upscaler(teacher.eval())(image.lr),
        "student": model_upscaler(student.eval())(image.lr),
    }
    height, width = outputs["student"].shape[:2]
    size = min(96, height, width)
    # the crop with the most detail: largest gradient energy on a coarse grid
    gray = hr[:height, :width].mean(axis=2)
    energy = np.abs(np.diff(gray, axis=0))[:, :-1] + np.abs(np.diff(gray, axis=1))[:-1, :]
    best, top, left = -1.0, 0, 0
    for y in range(0, max(1, height - size), max(1, size // 2)):
        for x in range(0, max(1, width - size), max(1, size // 2)):
            e = float(energy[y : y + size, x : x + size].sum())
            if e > best:
                best, top, left = e, y, x
    panels = {**outputs, "ground truth": hr}
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.9), dpi=110)
    for ax, (name, picture) in zip(axes, panels.items(), strict=True):
        ax.imshow(_crop(picture, top, left, size), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{image.name} ×{scale}, crop at ({left}, {top})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_card(report: CompressionReport, path: Path) -> None:
    """A model card: what it is, how it was made, its figures, and the licences that bind it."""
    t, s = report.teacher, report.student
    rows = "\n".join(
        f"| {g.dataset}{' (chose the checkpoint)' if g.used_for_selection else ''} | {g.bicubic:.3f} "
        f"| {g.teacher:.3f} | {g.student:.3f} | {g.student_minus_teacher:+.3f} |"
        for g in report.gaps
    )
    r = report.recipe
    p = report.params
    lam = p.lambda_ if p.lambda_ is not None else 1e-4
    budget = (
        f"parameter budget {p.target_params:,}"
        if p.target_params
        else f"MAC budget {p.target_gmacs} G"
        if p.target_gmacs
        else "the pruned density"
    )
    b, replan = report.budget, report.distill.replan
    replan_clause = (
        f", re-planned after {replan.at_iteration:,} of them at {replan.step_seconds * 1000:.0f} ms a step "
        f"to {replan.iterations:,}"
        if replan is not None
        else ""
    )
    finish_clause = (
        f", an L2-finish step {b.finish_step_ratio:.2f}× that" if b is not None and r.l2_finish else ""
    )
    budget_line = (
        f"- time budget: {b.budget_seconds / 60:g} min → {b.prune_iters:,} pruning and {b.distill_iters:,} "
        f"distillation iterations (measured: {b.distill_step_seconds * 1000:.0f} ms a step{finish_clause})"
        f"{replan_clause}; "
        f"the teacher labelled {b.labelled_images if b.labelled_images is not None else 'no'} of "
        f"{report.holdout.training_images} training images, the others kept their ground truth\n"
        if b is not None
        else ""
    )
    l2_finish_line = f"the last {r.l2_finish:.0%} on L2 to the ground truth, " if r.l2_finish else ""
    text = f"""# srcompress compact model: {s.config["family"]} ×{p.scale}

A compact super-resolution model made by srcompress from the teacher `{p.model}`
(`{report.teacher_source}`) with the three stages of "Compressing Deep Image Super-resolution Models"
(Jiang et al., 2024): OBProx-SG ℓ1 pruning, density-driven compression, knowledge distillation
(recipe `{report.recipe.name}`).

## Architecture

- student config: `{s.config}`
- (N_c, N_l, N_b) = {tuple(report.compress.chosen)}, chosen from {budget}
- params {s.params:,} ({s.params / t.params:.1%} of the teacher's {t.params:,}); MACs {s.macs / 1e9:.2f} G
  ({s.macs / t.macs:.1%}) at LR {s.lr_size[0]}x{s.lr_size[1]} (torch FlopCounterMode, MACs = FLOPs/2)
- latency: teacher {t.latency_ms:.1f} ms, student {s.latency_ms:.1f} ms ({report.latency_setup})

## Quality (PSNR-Y dB / SSIM-Y; crop = scale, SR rounded to uint8)

| set | bicubic | teacher | student | student − teacher |
|---|---|---|---|---|
{rows}

The checkpoint was chosen on {len(report.holdout.images)} image(s) held out from the training set
(seed {report.holdout.seed}); the other sets are reported only.

## How it was made

- prune: λ = {lam:g}, {report.prune.iterations} OBProx-SG steps, density d = {report.prune.density:.4f}
  (final phase: {report.prune.final_phase})
- compress: {report.compress.note}
- distill: recipe `{r.name}` — {report.distill.iterations:,} iterations, loss `{r.loss}` (α = {r.alpha}),
  {l2_finish_line}AdaMax lr {r.lr:g} ({r.schedule}, warm-up
  {r.warmup:.0%}), batch {r.batch_size} × LR patch {r.patch_size}, student init `{r.student_init}`,
  {report.distill.precision}, EMA {report.distill.ema_decay:.4f}
  (best held-out PSNR {report.distill.best_psnr:.3f} dB at iteration {report.distill.best_iteration})
{budget_line}
- seed {p.seed}; versions {report.versions}

## Licences

- Teacher weights: see their source (the RLFN weights of bytedance/RLFN are Apache-2.0).
- Training and validation images: the shared benchmark and training sets carry academic-use terms from
  their original publishers; a model trained on them inherits those terms — check before commercial use.

## Files

`model.safetensors` + `config.json` (load with `core.models.load_model`), `model.onnx` (max abs
difference to PyTorch {report.export.onnx_max_abs_diff:.2e};
dynamic shapes: {report.export.onnx_dynamic_shapes}),
`report.json`, `psnr_vs_params.png`, `learning_curve.png`, `crops.png`, `pipeline.log`.
{formats_section(report)}"""
    path.write_text(text)


def _figure(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def formats_section(report: CompressionReport) -> str:
    """The model card's table of deployable formats (empty when the job asked for none)."""
    q = report.quantize
    if q is None or not q.formats:
        return ""
    rows = "\n".join(
        f"| {f.name} | {f.precision} | {f.runtime} | {', '.join(f'`{name}`' for name in f.files)} "
        f"| {f.bytes:,} | {_figure(f.parity_db, 2)} | {_figure(f.quality_cost_db, 3)} | {_figure(f.psnr, 3)} "
        f"| {_figure(f.ssim, 4)} | {_figure(f.latency_ms, 1)} | {'yes' if f.ok else 'no: ' + f.reason} |"
        for f in q.formats
    )
    calibration = (
        f"int8 calibration: {q.calibration.method} on {q.calibration.patches} LR patches of "
        f"{q.calibration.patch_size}² from {', '.join(q.calibration.source)} (seed {q.calibration.seed}).\n"
        if q.calibration
        else ""
    )
    return f"""
## Deployable formats

Verified on {q.verification_set} against the fp32 PyTorch model (PSNR-Y {q.fp32_psnr:.3f} dB):
`parity_db` is the PSNR of the format's output against fp32's, `quality_cost_db` what it loses in
PSNR-Y against HR; latency {q.latency_setup}.
{calibration}
| format | precision | runtime | files | bytes | parity dB | cost dB | PSNR-Y | SSIM-Y | ms | offered |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}
"""
