"""Inference benchmark: latency, achieved GFLOP/s against the matmul peak, and peak memory.

    .venv/bin/python bench/infer.py [--big] [--repeats 5] [--json out.json] [--cache-dir DIR]
        [--student MODEL_DIR] [--no-formats]

One process: (1) fp32 matmul peak (torch.mm of 2048x2048 matrices for a few seconds, all threads);
(2) every preset at x2 on LR 640x360 (method.md §8's MAC size) through the eager fp32 path and the
path `choose_backend` picks — median latency, GMACs (FlopCounterMode / 2), achieved GFLOP/s
= 2·MACs / latency, % of the matmul peak, speed-up over eager, peak RSS while that preset ran;
(3) a 1920x1080 -> 3840x2160 tiled upscale with edsr_mini in a child process, for its own peak RSS;
(4) the exported formats (int8/fp16 ONNX, OpenVINO fp32/int8, NCNN) of edsr_mini, rlfn_s and a ~45K
student (--student, else one distilled for 300 steps here) against the fp32 ONNX Runtime path
(bench/formats.py), with the CPU's int8/bf16 instruction sets named.
`edsr` and `swinir` (the large ones, minutes per forward on a small CPU) run only with --big.
RLFN presets use the real weights from ../shared/weights when present (speed does not depend on the
weights, but choose_backend's PSNR check is more meaningful on a trained model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from formats import print_formats_table  # noqa: E402  (bench/formats.py)

from core.complexity import count_macs  # noqa: E402
from core.infer.runners import default_cache_dir  # noqa: E402
from core.infer.tuning import choose_backend, decision_path, machine_signature, prepare_backend  # noqa: E402
from core.infer.upscale import upscale_array  # noqa: E402
from core.models.build import create_model  # noqa: E402
from core.models.checkpoint import load_checkpoint  # noqa: E402
from core.onnx_export import cpu_cores  # noqa: E402

LR_SIZE = (640, 360)  # (W, H)
SMALL_PRESETS = ("edsr_mini", "rlfn_s", "swinir_mini", "edsr_baseline", "rlfn", "swinir_lightweight")
BIG_PRESETS = ("edsr", "swinir")
RLFN_WEIGHTS = {"rlfn_s": "RLFN_s_x2.pth", "rlfn": "RLFN_x2.pth"}


class PeakRSS:
    """Samples this process's RSS every few ms in a thread; `.peak` is the max since start()."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


def matmul_peak_gflops(size: int = 2048, seconds: float = 4.0) -> float:
    """Best 1-second window of fp32 torch.mm throughput (GFLOP/s) over `seconds`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            torch.mm(a, b)
            count += 1
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def matmul_rate_gflops(a: torch.Tensor, b: torch.Tensor, calls: int = 3) -> float:
    """fp32 torch.mm throughput over a few calls (~0.1-0.3 s): the 'peak' available right now."""
    start = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b)
    return 2 * a.shape[0] ** 3 * calls / (time.perf_counter() - start) / 1e9


def interleaved_latencies(
    runners: dict[str, object], lr: torch.Tensor, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-runner call times and the matmul rate measured right before each call.

    Runners alternate each round, and each call is preceded by a short torch.mm burst, so that load
    from other processes on a shared machine hits every path alike and "% of peak" can be taken
    against the matmul rate available at that moment rather than at the start of the run. Each
    runner was warmed up before (oneDNN primitives, ONNX export and session, SwinIR mask cache).
    """
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times: dict[str, list[float]] = {name: [] for name in runners}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            rates[name].append(matmul_rate_gflops(a, b))
            time.sleep(0.2)  # let the other runtime's spinning worker threads park before timing
            start = time.perf_counter()
            runner(lr)
            times[name].append(time.perf_counter() - start)
    return times, rates


SHARED = Path(os.environ.get("SRCOMPRESS_SHARED", REPO.parent / "shared"))
SET5 = SHARED / "data" / "benchmark" / "Set5"  # the backend choice is checked on it when present


def load_preset(name: str) -> tuple[torch.nn.Module, str]:
    weights = SHARED / "weights" / RLFN_WEIGHTS.get(name, "-")
    if weights.is_file():
        model, _info = load_checkpoint(weights, preset=name, scale=2)
        return model, weights.name
    return create_model(name, 2), "random"


def bench_preset(name: str, peak: float, repeats: int, cache_dir: Path) -> dict:
    torch.manual_seed(0)
    model, weights = load_preset(name)
    model.eval()
    macs = count_macs(model, LR_SIZE).macs
    lr = torch.rand(1, 3, LR_SIZE[1], LR_SIZE[0], generator=torch.Generator().manual_seed(0))
    row: dict = {"preset": name, "weights": weights, "gmacs": macs / 1e9, "load_before": os.getloadavg()[0]}
    start = time.perf_counter()
    picked = choose_backend(model, cache_dir, eval_dir=SET5 if SET5.is_dir() else None)
    row["choose_seconds"] = time.perf_counter() - start
    decision = json.loads(decision_path(model, cache_dir).read_text())
    runners = {"eager": prepare_backend(model, "eager")}
    if picked != "eager":
        runners[picked] = prepare_backend(model, picked, cache_dir)
    rss = {}
    for backend, runner in runners.items():  # warm-up call, with the process's peak RSS during it
        with PeakRSS() as sampler:
            runner(lr)
        rss[backend] = sampler.peak
    times, rates = interleaved_latencies(runners, lr, repeats)
    for label, backend in (("eager", "eager"), ("picked", picked)):
        seconds = statistics.median(times[backend])
        achieved = [2 * macs / t / 1e9 for t in times[backend]]
        row[label] = {
            "backend": backend,
            "latency_s": seconds,
            "latency_min_s": min(times[backend]),
            "gflops": 2 * macs / seconds / 1e9,
            "pct_peak": 100 * 2 * macs / seconds / 1e9 / peak,
            # Each call against the matmul rate measured just before it (robust to other processes).
            "pct_adjacent_peak": 100
            * statistics.median(g / r for g, r in zip(achieved, rates[backend], strict=True)),
            "adjacent_peak_gflops": statistics.median(rates[backend]),
            "peak_rss_mb": rss[backend] / 2**20,
        }
    row["speedup"] = row["eager"]["latency_s"] / row["picked"]["latency_s"]
    row["decision"] = {
        t["backend"]: (round(t["speedup"], 2), t["psnr"], t["accepted"]) for t in decision["trials"]
    }
    row["psnr_fp32"] = decision["psnr_fp32"]
    row["timing_lr_size"] = decision["timing_lr_size"]
    row["load_after"] = os.getloadavg()[0]
    return row


def own_peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM of its own address space. (getrusage's ru_maxrss is not used: on
    Linux a child started by fork + exec inherits the parent's high-water mark there.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_4k_child(backend: str, cache_dir: Path, tile: str) -> dict:
    """Upscale a 1920x1080 image to 3840x2160 with edsr_mini; report this process's own peak RSS."""
    torch.manual_seed(0)
    model = create_model("edsr_mini", 2).eval()
    rng = np.random.default_rng(0)
    image = rng.random((1080, 1920, 3), dtype=np.float32)
    runner = prepare_backend(model, backend, cache_dir)
    tiles: list[tuple[int, int]] = []
    start = time.perf_counter()
    out = upscale_array(
        model,
        image,
        tile=None if tile == "auto" else int(tile),
        backend=runner,
        on_progress=lambda i, n: tiles.append((i, n)),
    )
    seconds = time.perf_counter() - start
    return {
        "backend": backend,
        "tile": tile,
        "tiles": tiles[-1][1] if tiles else 0,
        "output": list(out.shape),
        "seconds": seconds,
        "peak_rss_mb": own_peak_rss_mb(),
    }


def bench_4k(backend: str, cache_dir: Path, tile: str) -> dict:
    command = [sys.executable, __file__, "--child-4k", backend, "--cache-dir", str(cache_dir), "--tile", tile]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(peak: float, rows: list[dict], upscale_4k: list[dict]) -> None:
    machine = machine_signature()
    threads = torch.get_num_threads()
    print(
        f"\nCPU {machine['cpu']}, {threads} threads, torch {machine['torch']}, ORT {machine['onnxruntime']}"
    )
    print(f"fp32 matmul peak (torch.mm 2048²): {peak:.1f} GFLOP/s; load = 1-min load average before-after")
    print("GMACs at x2, LR 640x360 (FlopCounterMode / 2); GFLOP/s and % of peak from the median latency;")
    print("'adjacent': median over calls of achieved / torch.mm rate measured just before that call\n")
    print(
        "| preset | GMACs | path | median (min) s | GFLOP/s | % peak (adjacent) | speed-up | RSS MB | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for label in ("eager", "picked"):
            r = row[label]
            speedup = "1.00" if label == "eager" else f"{row['speedup']:.2f}"
            print(
                f"| {row['preset']} | {row['gmacs']:.2f} | {r['backend']} | {r['latency_s']:.3f} "
                f"({r['latency_min_s']:.3f}) | {r['gflops']:.1f} | "
                f"{r['pct_peak']:.0f}% ({r['pct_adjacent_peak']:.0f}%) | {speedup}x | "
                f"{r['peak_rss_mb']:.0f} | {row['load_before']:.1f}-{row['load_after']:.1f} |"
            )
    print("\nchoose_backend trials (speed-up on its timing input, mean Y-PSNR on Set5, accepted):")
    for row in rows:
        size = "x".join(map(str, row["timing_lr_size"]))
        print(f"  {row['preset']} ({row['weights']}, at {size}): fp32 {row['psnr_fp32']}, {row['decision']}")
    for result in upscale_4k:
        print(
            f"\n4K: edsr_mini 1920x1080 -> 3840x2160, {result['backend']}, tile {result['tile']} "
            f"({result['tiles']} tiles): {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
            "(own process)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="also run edsr and swinir once (slow)")
    parser.add_argument("--presets", nargs="+", help="only these presets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir() / "bench")
    parser.add_argument("--tile", default="auto", help="LR tile for the 4K run (default auto)")
    parser.add_argument("--child-4k", metavar="BACKEND", help=argparse.SUPPRESS)
    parser.add_argument("--student", type=Path, help="a ~45K student model folder for the formats table")
    parser.add_argument("--no-formats", action="store_true", help="skip the exported formats (4)")
    args = parser.parse_args()
    torch.set_num_threads(cpu_cores())

    if args.child_4k:
        print(json.dumps(run_4k_child(args.child_4k, args.cache_dir, args.tile)))
        return

    peak = matmul_peak_gflops()
    print(f"matmul peak {peak:.1f} GFLOP/s", flush=True)
    presets = args.presets or list(SMALL_PRESETS) + (list(BIG_PRESETS) if args.big else [])
    rows = []
    for name in presets:
        repeats = 1 if name in BIG_PRESETS else args.repeats
        rows.append(bench_preset(name, peak, repeats, args.cache_dir))
        print(json.dumps(rows[-1]), flush=True)
    edsr_mini = next((r for r in rows if r["preset"] == "edsr_mini"), None)
    backend_4k = edsr_mini["picked"]["backend"] if edsr_mini else "eager"
    upscale_4k = [bench_4k(backend_4k, args.cache_dir, args.tile)]
    if backend_4k != "eager":
        upscale_4k.append(bench_4k("eager", args.cache_dir, args.tile))
    formats = [] if args.no_formats else bench_all_formats(args.student, args.repeats)
    print_table(peak, rows, upscale_4k)
    if formats:
        print_formats_table(formats, LR_SIZE)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"matmul_peak_gflops": peak, "rows": rows, "4k": upscale_4k, "formats": formats}, indent=2
            )
        )


def quick_student(workdir: Path) -> torch.nn.Module:
    """A ~45K RLFN student inherited from the real teacher and distilled for 300 steps (as the tests do)."""
    from core.job import JobConfig
    from core.models.checkpoint import load_model
    from core.pipeline import run_pipeline

    data = SHARED / "data"
    config = JobConfig(
        model="rlfn_s",
        scale=2,
        teacher_weights=SHARED / "weights" / "RLFN_s_x2.pth",
        train_data=[data / "train" / "T91_partial53"],
        val_data=[SET5],
        target_params=45_000,
        prune_iters=4,
        distill_iters=300,
        validate_every=0,
    )
    run_pipeline(config, workdir)
    return load_model(workdir / "student")


def bench_all_formats(student_dir: Path | None, repeats: int) -> list[dict]:
    """Section (4): edsr_mini, rlfn_s and the ~45K student through every exported format."""
    import tempfile

    from formats import bench_formats

    from core.models.checkpoint import load_model

    results = []
    for name in ("edsr_mini", "rlfn_s"):
        torch.manual_seed(0)
        model, _weights = load_preset(name)
        results.append(bench_formats(name, model.eval(), SHARED, LR_SIZE, repeats))
        print(json.dumps(results[-1]), flush=True)
    with tempfile.TemporaryDirectory(prefix="srcompress-bench-student-") as tmp:
        student = load_model(student_dir) if student_dir else quick_student(Path(tmp))
    label = f"student {sum(p.numel() for p in student.parameters()):,}"
    results.append(bench_formats(label, student.eval(), SHARED, LR_SIZE, repeats))
    print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
