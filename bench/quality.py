"""How good a student does the product make in N minutes? One compression job, run as a user runs it.

    .venv/bin/python bench/quality.py --minutes 60 --out DIR [--scale 2|4] [--student-preset edsr_mini]
        [--target-params 45000] [--recipe fast|paper] [--json FILE]

The job is `core.pipeline.run_pipeline` with `budget_minutes` (pruning, teacher labelling and
distillation inside the budget), the real RLFN-S teacher from ../shared/weights, training images from
../shared/data/train, and Set5 / Set14 / B100 as validation sets that are *reported only*: the
checkpoint is chosen on images held out from the training set. The student lands in DIR as
`model.safetensors` + `config.json`, beside the job's report and plots (DIR/job/out). Prints a
markdown row set for bench/RESULTS.md with the CPU and its measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from infer import matmul_peak_gflops  # bench/infer.py: the machine's measured fp32 peak

from core.job import CompressionReport, JobConfig
from core.pipeline import run_pipeline

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRAIN_SETS = ("DIV2K_test_LRx4", "Sun_Hays80", "T91_partial53")
VAL_SETS = ("Set5", "Set14", "B100")
TEACHERS = {2: "RLFN_s_x2.pth", 4: "RLFN_s_x4.pth"}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def job_config(minutes: float, scale: int, val_sets: list[str], **overrides) -> JobConfig:
    """The benchmark's job: only the model, scale, teacher, data, a size target and a budget, plus
    whatever the caller overrides (a recipe variant)."""
    fields = dict(
        model="rlfn_s",
        scale=scale,
        teacher_weights=SHARED / "weights" / TEACHERS[scale],
        train_data=[SHARED / "data" / "train" / name for name in TRAIN_SETS],
        val_data=[SHARED / "data" / "benchmark" / name for name in val_sets],
        target_params=45_000,
        budget_minutes=minutes,
        seed=0,
    )
    fields.update(overrides)
    if fields.get("student_preset"):
        fields.pop("target_params")
    return JobConfig(**{k: v for k, v in fields.items() if v is not None})


def run_job(config: JobConfig, workdir: Path) -> tuple[CompressionReport, dict[str, float]]:
    """Run the job; returns its report and its wall clock (budgeted part, and all of it)."""
    began = time.perf_counter()
    report = run_pipeline(config, workdir, on_progress=_print_progress())
    seconds = report.stage_seconds
    timing = {
        "budgeted_minutes": sum(seconds[s] for s in ("pruning", "compressing", "distilling")) / 60,
        "total_minutes": (time.perf_counter() - began) / 60,
    }
    return report, timing


def _print_progress():
    last = {"stage": None, "time": 0.0}

    def on_progress(stage: str, fraction: float, metrics: dict) -> None:
        now = time.perf_counter()
        if stage != last["stage"] or "val_psnr" in metrics or now - last["time"] > 120:
            shown = {k: v for k, v in metrics.items() if k in ("iteration", "val_psnr", "eta_s", "phase")}
            print(f"  {stage:<12} {fraction:6.1%} {shown}", flush=True)
            last.update(stage=stage, time=now)

    return on_progress


def result_row(name: str, report: CompressionReport, timing: dict[str, float]) -> dict:
    return {
        "variant": name,
        "params": report.student.params,
        "iterations": report.distill.iterations,
        "budgeted_minutes": round(timing["budgeted_minutes"], 2),
        "total_minutes": round(timing["total_minutes"], 2),
        "psnr": {g.dataset: round(g.student, 3) for g in report.gaps},
        "teacher": {g.dataset: round(g.teacher, 3) for g in report.gaps},
        "bicubic": {g.dataset: round(g.bicubic, 3) for g in report.gaps},
        "recipe": report.recipe.model_dump(),
    }


def markdown(rows: list[dict]) -> str:
    sets = list(rows[0]["psnr"])
    lines = [
        "| variant | params | iterations | minutes (budgeted / total) | "
        + " | ".join(f"{s}{' (selection)' if s == 'holdout' else ''}" for s in sets)
        + " |",
        "|---" * (4 + len(sets)) + "|",
    ]
    first = rows[0]
    lines.append("| bicubic | – | – | – | " + " | ".join(f"{first['bicubic'][s]:.2f}" for s in sets) + " |")
    lines.append("| teacher | – | – | – | " + " | ".join(f"{first['teacher'][s]:.2f}" for s in sets) + " |")
    for row in rows:
        cells = " | ".join(f"{row['psnr'][s]:.2f} ({row['psnr'][s] - row['teacher'][s]:+.2f})" for s in sets)
        lines.append(
            f"| {row['variant']} | {row['params']:,} | {row['iterations']:,} | "
            f"{row['budgeted_minutes']:.1f} / {row['total_minutes']:.1f} | {cells} |"
        )
    return "\n".join(lines)


def machine() -> str:
    peak = matmul_peak_gflops()
    return f"{cpu_name()}, {torch.get_num_threads()} threads, fp32 matmul peak {peak:.0f} GFLOP/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=60.0, help="budget: pruning + labelling + distillation"
    )
    parser.add_argument("--out", type=Path, required=True, help="the student and the job's files go here")
    parser.add_argument("--scale", type=int, choices=sorted(TEACHERS), default=2)
    parser.add_argument("--student-preset", help="e.g. edsr_mini or swinir_mini instead of the rule's RLFN")
    parser.add_argument("--target-params", type=int, default=45_000)
    parser.add_argument("--recipe", choices=["fast", "paper"], default="fast")
    parser.add_argument("--val", nargs="+", default=list(VAL_SETS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    measured = machine()  # before the job, on an idle machine
    print(measured, flush=True)
    config = job_config(
        args.minutes, args.scale, args.val, recipe=args.recipe, student_preset=args.student_preset,
        target_params=args.target_params,
    )  # fmt: skip
    workdir = args.out / "job"
    if workdir.exists():
        shutil.rmtree(workdir)
    report, timing = run_job(config, workdir)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(workdir / "out" / name, args.out / name)
    row = result_row(args.student_preset or f"{args.recipe} (rule, ≤{args.target_params:,})", report, timing)
    print(f"\n{measured}\n`{' '.join(sys.argv)}`\n")
    print(markdown([row]))
    if args.json:
        args.json.write_text(json.dumps({"machine": measured, "argv": sys.argv, "rows": [row]}, indent=2))


if __name__ == "__main__":
    main()
