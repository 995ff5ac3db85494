"""Which recipe makes the best student per minute? Variants side by side at equal wall clock.

    .venv/bin/python bench/recipes.py --minutes 20 --variants fast l1_gt paper [--val Set5 Set14 B100]
        [--out DIR] [--json FILE]

Each variant is one compression job (bench/quality.py's: RLFN-S ×2 teacher, ≤ 45,000-param student,
the shared training images, a time budget) with some of the `fast` recipe's knobs changed. The jobs run
one after another, never at once (2 cores). Variants are ranked on the images held out from the
training set (the column marked "selection"); Set5 / Set14 / B100 are reported, never chosen on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from quality import VAL_SETS, job_config, machine, markdown, result_row, run_job

# Each variant: JobParams overrides of the default (fast) recipe.
VARIANTS: dict[str, dict] = {
    "fast": {},
    "paper": {"recipe": "paper"},  # the paper's recipe, whole: scratch, 1e-4, Laplacian KD, step decay
    # the loss, all else as `fast`
    "l1_gt": {"distill_loss": "l1_gt"},
    "pixel_hf": {"distill_loss": "pixel_hf"},
    "l1_teacher": {"distill_loss": "l1_teacher"},
    "blend": {"distill_loss": "blend"},
    "paper_loss": {"distill_loss": "paper"},
    "laplacian_flat": {"distill_loss": "laplacian_flat"},
    "l2_finish": {"l2_finish": 0.25},  # the last quarter on L2 to the ground truth
    "no_l2_finish": {"l2_finish": 0.0},
    # init
    "scratch": {"student_init": "scratch"},
    # lr and its decay
    "lr1e-3": {"distill_lr": 1e-3},
    "lr4e-3": {"distill_lr": 4e-3},
    "linear": {"lr_schedule": "linear"},
    # batch × patch
    "batch32": {"batch_size": 32},
    "patch64": {"patch_size": 64},
    # a capacity-bound student on a long budget: larger patches (ESA's pooled map sees 9x9 instead of
    # 6x6 cells of context) and the last quarter on PSNR's own loss
    "patch64_l2": {"patch_size": 64, "l2_finish": 0.25},
    # the next step of the same lever at about the same pixels per step (8 x 96² vs 16 x 64²): twice
    # the ESA's context per patch, half the patches per batch (5 of the 53 T91 images are too small);
    # lost to patch64_l2 by 0.05 dB held-out at 50 minutes, a 17% dearer step (bench/RESULTS.md)
    "patch96_batch8_l2": {"patch_size": 96, "batch_size": 8, "l2_finish": 0.25},
    # the student's shape at the same size: the rule's (20, 1, 4) spends half its 44,864 params on four
    # ESAs of the teacher's width 16; three blocks of 24 channels (43,068 params, a multiple of the
    # CPU's SIMD width) trade one ESA for a wider body and a 21% cheaper step on AVX2 (tied at 50
    # minutes, bench/RESULTS.md)
    "wide_shallow": {"student": (24, 1, 3)},
    # the same student trained over-parameterized: every 3×3 conv with a 1×1 branch and a 1×1→3×3
    # expansion to twice its inputs, folded into one 3×3 after training (core.models.overparam)
    "patch64_l2_overparam": {"patch_size": 64, "l2_finish": 0.25, "overparam": 2.0},
    # the same, alone: `fast` has it from 30 minutes on (it won there: bench/RESULTS.md); this variant
    # measures it on shorter budgets, where `fast` trains plain
    "overparam": {"overparam": 2.0},
    # teacher-labelled data: the same scenes downscaled, labelled by the teacher like any image
    "rescale": {"rescales": [0.75, 0.5]},
    # precision (`auto`, fast's own, is bf16 where the CPU has native bf16; bf16 falls back to fp32,
    # and says so, where it lacks it)
    "bf16": {"precision": "bf16"},
    "fp32": {"precision": "fp32"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="budget of each variant")
    parser.add_argument("--variants", nargs="+", default=["fast", "l1_gt", "paper"], choices=VARIANTS)
    parser.add_argument("--val", nargs="+", default=list(VAL_SETS))
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    measured = machine()
    print(measured, flush=True)
    rows = []
    for name in args.variants:
        print(f"{name}: {VARIANTS[name] or 'the fast recipe'}", flush=True)
        workdir = args.out / name
        if workdir.exists():
            shutil.rmtree(workdir)
        report, timing = run_job(job_config(args.minutes, 2, args.val, **VARIANTS[name]), workdir)
        rows.append(result_row(name, report, timing))
        print(markdown(rows[-1:]), flush=True)
        if args.json:  # after every variant: a stopped run keeps what it measured
            args.json.write_text(json.dumps({"machine": measured, "argv": sys.argv, "rows": rows}, indent=2))
    print(f"\n{measured}\n`{' '.join(sys.argv)}`\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
