"""The exported formats as inference paths: each one's latency and speed-up over fp32 ONNX Runtime.

Used by bench/infer.py (one run): for a model, build every format its family holds (core.quantize,
calibrated on ../shared/data/train, verified on Set5), then time the format runners interleaved with
the fp32 ONNX Runtime path at LR 640x360, batch 1, and ask choose_backend which path it would serve
(the fastest within 0.05 dB of fp32 PSNR-Y on Set5, exported formats included).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from core.data.datasets import TrainImages, list_images, load_eval_set
from core.formats import FORMATS
from core.infer.tuning import choose_backend
from core.models.network import model_config
from core.quantize.runtimes import format_runner_for
from core.quantize.stage import QuantizeConfig, run_quantize

CPU_UNITS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
TRAIN_SETS = ("DIV2K_test_LRx4", "Sun_Hays80", "T91_partial53")


def cpu_units() -> list[str]:
    """The int8/bf16-relevant instruction sets this CPU reports (empty list: none of them)."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    return [unit for unit in CPU_UNITS if unit in flags]


def bench_formats(name: str, model: nn.Module, shared: Path, lr_size: tuple[int, int], repeats: int) -> dict:
    """Build, verify and time every format of `model`; returns one row per path."""
    from infer import interleaved_latencies  # bench/infer.py: interleaved calls, robust to other load

    scale = model_config(model).scale
    formats = [f for f in FORMATS if f in type(model_config(model)).export_formats]
    set5 = shared / "data" / "benchmark" / "Set5"
    paths = [p for folder in TRAIN_SETS for p in list_images(shared / "data" / "train" / folder)]
    with tempfile.TemporaryDirectory(prefix="srcompress-bench-formats-") as tmp:
        result = run_quantize(
            model,
            Path(tmp),
            QuantizeConfig(formats=formats, calibration="percentile", calibration_patches=128),
            verify_images=list(load_eval_set(set5, scale)),
            verify_name="Set5",
            calibration=TrainImages(paths, scale, lr_patch=48),
            calibration_source=list(TRAIN_SETS),
        )
        offered = [f for f in result.formats if f.ok]
        runners = {f.name: format_runner_for(model, f.name, Path(tmp)) for f in offered}
        lr = torch.rand(1, 3, lr_size[1], lr_size[0], generator=torch.Generator().manual_seed(0))
        for runner in runners.values():
            runner(lr)  # warm-up
        times, _rates = interleaved_latencies(runners, lr, repeats)
        candidates = {n: r for n, r in runners.items() if n != "onnx"}
        picked = choose_backend(model, Path(tmp) / "cache", formats=candidates, eval_dir=set5)
    base = statistics.median(times["onnx"]) if "onnx" in times else None
    rows = []
    for f in result.formats:
        seconds = statistics.median(times[f.name]) if f.name in times else None
        rows.append(
            {
                "path": f.name,
                "precision": f.precision,
                "runtime": f.runtime,
                "latency_s": seconds,
                "speedup_vs_ort_fp32": base / seconds if base and seconds else None,
                "parity_db": f.parity_db,
                "quality_cost_db": f.quality_cost_db,
                "ok": f.ok,
                "reason": f.reason,
            }
        )
    return {"preset": name, "fp32_psnr_set5": result.fp32_psnr, "paths": rows, "choose_backend": picked}


def print_formats_table(results: list[dict], lr_size: tuple[int, int]) -> None:
    units = cpu_units()
    print(
        f"\nExported formats at LR {lr_size[0]}x{lr_size[1]}, batch 1 (median of interleaved calls); "
        f"CPU int8/bf16 units: {', '.join(units) if units else 'none'}"
    )
    print("| model | path | precision | latency s | vs ORT fp32 | parity dB | cost dB (Set5) | offered |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        for row in result["paths"]:
            latency = f"{row['latency_s']:.3f}" if row["latency_s"] else "—"
            speedup = f"{row['speedup_vs_ort_fp32']:.2f}x" if row["speedup_vs_ort_fp32"] else "—"
            parity = f"{row['parity_db']:.1f}" if row["parity_db"] is not None else "—"
            cost = f"{row['quality_cost_db']:+.3f}" if row["quality_cost_db"] is not None else "—"
            offered = "yes" if row["ok"] else f"no: {row['reason']}"
            print(
                f"| {result['preset']} | {row['path']} | {row['precision']} | {latency} | {speedup} "
                f"| {parity} | {cost} | {offered} |"
            )
        print(f"  choose_backend for {result['preset']} (within 0.05 dB on Set5): {result['choose_backend']}")
