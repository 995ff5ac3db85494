"""KD training speed: the naive loop (teacher forward every step) vs the fast loop (teacher output
computed once per training image, patches cropped from it). One process, side by side.

    .venv/bin/python bench/train.py [--iters 30] [--student 20,1,4] [--repeats 15] [--compare-iters N]

Teacher: rlfn_s x2 from ../shared/weights; student: an rlfn of about 45K params; training images:
../shared/data/train/DIV2K_test_LRx4 (HR ~510 px), batch 16, LR patch 48. Prints iterations per second
for both loops, the speed-up, and the one-off cost of the teacher cache.

Then the parts of one step, timed in turns (the minimum of --repeats each, so that load from other
processes does not decide the figures): the teacher's forward on the batch (what the fast loop saves),
the batch, the student's forward, the KD loss, backward, optimizer step. With these parts the fast
loop can be at most (teacher + step) / step times the naive one: the student's own step bounds it.

With --compare-iters N, both loops then train the same student for N iterations (same init, seed and
batches; lr 2e-3) and the final EMA weights are scored on Set5: does the cached target change quality?
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from core.complexity import count_macs, count_params
from core.data.datasets import TrainImages, list_images
from core.distill.stage import DistillConfig, make_optimizer, run_distill, teacher_outputs
from core.loop import CHANNELS_LAST, to_device
from core.losses import kd_loss_parts
from core.models.build import build_model
from core.models.checkpoint import load_checkpoint
from core.results import DistillResult

SHARED = Path(__file__).resolve().parents[2] / "shared"
NAIVE_ONLY = "teacher forward (naive loop only)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--images", type=int, default=100, help="training images to use")
    parser.add_argument("--student", default="20,1,4", help="nc,nl,nb of the rlfn student")
    parser.add_argument("--repeats", type=int, default=15, help="turns of the component timings")
    parser.add_argument(
        "--compare-iters", type=int, default=0, help="also train both loops this long and compare Set5"
    )
    args = parser.parse_args()

    teacher, _ = load_checkpoint(SHARED / "weights" / "RLFN_s_x2.pth", preset="rlfn_s", scale=2)
    nc, nl, nb = (int(v) for v in args.student.split(","))
    paths = list_images(SHARED / "data" / "train" / "DIV2K_test_LRx4")[: args.images]
    began = time.perf_counter()
    data = TrainImages(paths, 2, lr_patch=48, batch_size=16, seed=0)
    load_seconds = time.perf_counter() - began
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(data)} images loaded in {load_seconds:.1f} s"
    )

    rows = []
    # naive, fast, naive again: if the machine's load changed during the run, the two naive rates differ
    runs = (
        ("naive (teacher every step)", False),
        ("fast (cached teacher output)", True),
        ("naive, again", False),
    )
    for name, cached in runs:
        result = train_student(teacher, (nc, nl, nb), data, cached, args.iters)
        rows.append((name, result.iterations_per_second, result.teacher_cache_seconds))
    student = build_model(teacher.config.with_triple(nc, nl, nb))
    print(f"student {nc},{nl},{nb}: {count_params(student).total:,} params; teacher rlfn_s 454,620")
    print(f"{'loop':<32}{'it/s':>8}{'cache (s)':>12}")
    for name, rate, cache in rows:
        print(f"{name:<32}{rate:>8.2f}{cache:>12.1f}")
    naive, fast = (rows[0][1] + rows[2][1]) / 2, rows[1][1]
    print(
        f"speed-up of the fast loop: {fast / naive:.2f}x "
        f"(break-even after {rows[1][2] / (1 / naive - 1 / fast):.0f} iterations including the cache)"
    )
    # A few images suffice for timing the parts (the cache is computed for every image of `data`).
    step_parts(teacher, student, TrainImages(paths[:8], 2, lr_patch=48, batch_size=16, seed=0), args.repeats)

    if args.compare_iters:
        # Same student init, seed and batches: the loops differ only in where the teacher target
        # comes from (a per-patch run with zero padding, or a crop of the whole-image output).
        set5 = SHARED / "data" / "benchmark" / "Set5"
        print(f"\nquality: {args.compare_iters} iterations at lr 2e-3, Set5 of the final EMA weights")
        for name, cached in (("naive", False), ("fast", True)):
            result = train_student(teacher, (nc, nl, nb), data, cached, args.compare_iters, set5, lr=2e-3)
            final = result.val_curve[-1]
            print(f"  {name:<8}{final.psnr:9.3f} dB {final.ssim:8.4f}   {result.seconds:7.0f} s in all")


def train_student(
    teacher: nn.Module,
    triple: tuple[int, int, int],
    data: TrainImages,
    cached: bool,
    iterations: int,
    val_dir: Path | None = None,
    lr: float = 1e-4,
) -> DistillResult:
    """KD-train a fresh student (seed 0) through `run_distill`; validates only at the end."""
    torch.manual_seed(0)
    student = build_model(teacher.config.with_triple(*triple))
    config = DistillConfig(
        iterations=iterations, teacher_cache=cached, lr=lr, validate_every=0, checkpoint_every=10**9
    )
    with tempfile.TemporaryDirectory() as workdir:
        _, result = run_distill(student, teacher, data, val_dir, config, Path(workdir), torch.device("cpu"))
    return result


def step_parts(teacher: nn.Module, student: nn.Module, data: TrainImages, repeats: int) -> None:
    """Minimum time of each part of a KD step, the parts taking turns."""
    device = torch.device("cpu")
    teacher = teacher.to(memory_format=CHANNELS_LAST).eval().requires_grad_(False)
    student = student.to(memory_format=CHANNELS_LAST).train()
    optimizer = make_optimizer(student, DistillConfig())
    cache = teacher_outputs(teacher, data, device)
    best: dict[str, float] = {}

    @contextmanager
    def timed(name: str):
        began = time.perf_counter()
        yield
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - began)

    for iteration in range(1, repeats + 2):
        if iteration == 2:
            best.clear()  # the first turn warms up oneDNN's kernels
        with timed("batch with cached target"):
            lr, hr, target = [to_device(t, device) for t in data.batch(iteration, cache)]
        with timed(NAIVE_ONLY), torch.no_grad():
            teacher(lr)
        with timed("student forward"):
            out = student(lr)
        with timed("KD loss"):
            loss = kd_loss_parts(out, target, hr).total
        optimizer.zero_grad(set_to_none=True)
        with timed("backward (student + loss)"):
            loss.backward()
        with timed("optimizer step"):
            optimizer.step()
    teacher_seconds = best.pop(NAIVE_ONLY)
    step = sum(best.values())
    print(f"\nparts of one step, minimum of {repeats} turns (ms):")
    for name, seconds in [*best.items(), ("= fast step", step), (NAIVE_ONLY, teacher_seconds)]:
        print(f"  {name:<36}{1000 * seconds:>8.1f}")
    print(
        f"speed-up the fast loop can reach: (teacher + step) / step = {(teacher_seconds + step) / step:.2f}x"
    )
    # Why the bound is what it is: the rate at which each part does its arithmetic. A training step
    # costs about 3 forwards (backward = 2); the small student's convs run far below the teacher's rate.
    patch = (lr.shape[-1], lr.shape[-2])
    teacher_flops = count_macs(teacher, patch).flops * lr.shape[0]
    student_flops = count_macs(student, patch).flops * lr.shape[0]
    print(
        f"arithmetic rate: teacher forward {teacher_flops / teacher_seconds / 1e9:.0f} GFLOP/s "
        f"({teacher_flops / student_flops:.1f}x the student's MACs); student forward "
        f"{student_flops / best['student forward'] / 1e9:.0f} GFLOP/s, whole fast step "
        f"{3 * student_flops / step / 1e9:.0f} GFLOP/s (counting 3 forwards)"
    )


if __name__ == "__main__":
    main()
