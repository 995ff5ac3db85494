"""Does the paper's KD pay on a real teacher? Prune + compress RLFN-S ×2 to ~10% of its parameters,
then train the same student twice with the same wall-clock budget: with the KD loss (fast loop,
cached teacher outputs) and with plain L1 to the ground truth (no teacher).

    .venv/bin/python bench/quality.py [--minutes 20] [--lr 2e-3] [--prune-iters 200] [--target-params 45000]

Data: ../shared/data/train (HR images; LR made with the MATLAB bicubic), validation Set5/Set14/B100.
The default run takes under an hour on a 2-core CPU. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from core.compress.stage import CompressConfig, run_compress
from core.data.datasets import TrainImages, list_images
from core.distill.stage import DistillConfig, run_distill
from core.evaluate import evaluate_dataset, evaluate_model
from core.models import build_model, load_checkpoint, parse_config
from core.pipeline import measure_latency
from core.prune.stage import PruneConfig, run_prune
from core.training import seed_everything

SHARED = Path(__file__).resolve().parents[2] / "shared"
VAL_SETS = ("Set5", "Set14", "B100")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget per student")
    parser.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="distillation lr of both students (the 1e-4 default suits the paper's 800k iterations; "
        "a budget of a few thousand needs more)",
    )
    parser.add_argument("--prune-iters", type=int, default=200)
    parser.add_argument("--lambda", dest="lambda_", type=float, default=1e-4)
    parser.add_argument("--target-params", type=int, default=45_000)
    parser.add_argument("--train", nargs="+", default=["DIV2K_test_LRx4", "Sun_Hays80", "T91_partial53"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    seed_everything(0, deterministic=False)

    teacher, _ = load_checkpoint(SHARED / "weights" / "RLFN_s_x2.pth", preset="rlfn_s", scale=2)
    teacher = teacher.to(device)
    paths = [p for name in args.train for p in list_images(SHARED / "data" / "train" / name)]
    data = TrainImages(paths, 2, lr_patch=48, batch_size=16, seed=0)
    print(f"{len(data)} training images ({len(data.skipped)} too small), device {device}")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        began = time.perf_counter()
        _, prune = run_prune(
            teacher, data, PruneConfig(iterations=args.prune_iters, lambda_=args.lambda_), workdir, device
        )
        print(
            f"prune: {prune.iterations} steps, λ {args.lambda_:g}, d = {prune.density:.4f} "
            f"({time.perf_counter() - began:.0f} s)"
        )
        compress = run_compress(
            teacher.config, prune.density, CompressConfig(target_params=args.target_params)
        )
        print(f"compress: {compress.note}")

        students = {}
        for name, loss in (("KD student", "kd"), ("no-KD student (L1)", "l1")):
            torch.manual_seed(0)
            student = build_model(parse_config(compress.student_config))
            config = DistillConfig(
                iterations=10**7,  # the wall-clock budget ends the run
                loss=loss,
                lr=args.lr,
                lr_milestones=[],
                validate_every=0,
                checkpoint_every=10**9,
                max_seconds=args.minutes * 60,
            )
            run_dir = workdir / loss
            run_dir.mkdir()
            model, result = run_distill(
                student, teacher if loss == "kd" else None, data, None, config, run_dir, device
            )
            students[name] = (model, result)
            print(
                f"{name}: {result.iterations} iterations in {result.seconds:.0f} s "
                f"({result.iterations_per_second:.2f} it/s)"
            )

    rows = {"bicubic": {}, "teacher rlfn_s": {}, **{name: {} for name in students}}
    for dataset in VAL_SETS:
        folder = SHARED / "data" / "benchmark" / dataset
        rows["bicubic"][dataset] = evaluate_model("bicubic", 2, None, folder)
        rows["teacher rlfn_s"][dataset] = evaluate_dataset(teacher, folder, 2, device=device)
        for name, (model, _) in students.items():
            rows[name][dataset] = evaluate_dataset(model, folder, 2, device=device)

    cpu = torch.device("cpu")
    lr_size = (320, 180)
    print(
        "\n| model | params | GMACs (LR 640x360) | iterations | "
        f"CPU latency ms (LR {lr_size[0]}x{lr_size[1]}) | " + " | ".join(VAL_SETS) + " |"
    )
    print("|---" * (5 + len(VAL_SETS)) + "|")
    figures = {}
    for name, scores in rows.items():
        if name == "bicubic":
            params, gmacs, iters, latency = "–", "–", "–", "–"
        elif name.startswith("teacher"):
            params, gmacs = f"{compress.teacher.params:,}", f"{compress.teacher.macs / 1e9:.2f}"
            iters, latency = "–", f"{measure_latency(teacher.to(cpu), cpu, lr_size):.0f}"
        else:
            model, result = students[name]
            params, gmacs = f"{compress.student.params:,}", f"{compress.student.macs / 1e9:.2f}"
            iters, latency = f"{result.iterations:,}", f"{measure_latency(model.to(cpu), cpu, lr_size):.0f}"
        cells = " | ".join(f"{s.psnr:.2f} / {s.ssim:.4f}" for s in scores.values())
        print(f"| {name} | {params} | {gmacs} | {iters} | {latency} | {cells} |")
        figures[name] = {d: {"psnr": s.psnr, "ssim": s.ssim} for d, s in scores.items()}
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "figures": figures,
                    "density": prune.density,
                    "student": list(compress.chosen),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
