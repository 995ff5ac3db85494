"""Training precision on this CPU: seconds per distillation step in fp32 and in bf16 autocast, measured
as a budgeted job measures the step it plans with (`core.distill.stage.measure_distill_step`), in turns.

    .venv/bin/python bench/precision.py [--student 20,1,4] [--turns 3] [--seconds 5]

The step is the `fast` recipe's (L1 to the ground truth, AdaMax 2e-3, EMA, channels-last, batch 16, LR
patch 48) on an rlfn student of the RLFN-S ×2 teacher's family (20,1,4: the ≤ 45,000-param student of
bench/quality.py). On a CPU without native bf16 (AVX512-BF16 or AMX) bf16 falls back to fp32 and the
script says so. Speed only: what bf16 does to the student's quality needs bench/recipes.py's `fp32`
and `bf16` variants side by side at equal wall clock.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from infer import matmul_peak_gflops  # bench/infer.py: the machine's measured fp32 peak
from quality import cpu_name

from core.data.datasets import TrainImages, list_images
from core.distill.stage import DistillConfig, measure_distill_step
from core.loop import cpu_has_fast_bf16, resolve_precision
from core.models.build import build_model
from core.models.checkpoint import load_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
PRECISIONS = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="20,1,4", help="nc,nl,nb of the rlfn student")
    parser.add_argument("--turns", type=int, default=3, help="fp32 and bf16 take turns this many times")
    parser.add_argument("--seconds", type=float, default=5.0, help="least time of each measurement")
    args = parser.parse_args()

    device = torch.device("cpu")
    teacher, _ = load_checkpoint(SHARED / "weights" / "RLFN_s_x2.pth", preset="rlfn_s", scale=2)
    torch.manual_seed(0)
    student = build_model(teacher.config.with_triple(*(int(v) for v in args.student.split(","))))
    paths = list_images(SHARED / "data" / "train" / "DIV2K_test_LRx4")[:16]
    data = TrainImages(paths, 2, lr_patch=48, batch_size=16, seed=0)
    print(
        f"{cpu_name()}, {torch.get_num_threads()} threads, fp32 matmul peak {matmul_peak_gflops():.0f} "
        f"GFLOP/s, native bf16: {cpu_has_fast_bf16()}"
    )
    seconds: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    for _ in range(args.turns):
        for name in PRECISIONS:
            config = DistillConfig(loss="l1_gt", lr=2e-3, precision=name)
            seconds[name].append(
                measure_distill_step(
                    student, None, data, None, config, device, min_seconds=args.seconds
                ).seconds
            )
    fp32 = min(seconds["fp32"])
    print("| precision | runs as | s/step (best of turns) | all turns | speed vs fp32 |")
    print("|---|---|---|---|---|")
    for name in PRECISIONS:
        used = resolve_precision(name, device)
        turns = " / ".join(f"{s:.4f}" for s in seconds[name])
        best = min(seconds[name])
        print(f"| {name} | {used.name} ({used.reason}) | {best:.4f} | {turns} | {fp32 / best:.2f}x |")


if __name__ == "__main__":
    main()
