"""A runner per deployable format: LR batch (N, 3, H, W) float32 in [0, 1] → SR batch, on the CPU.

Runners load their files once and keep the runtime's session; they satisfy core.infer.runners.Runner,
so tiling, evaluation and serving use them like any PyTorch backend.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from core.formats import FORMATS
from core.onnx_export import INPUT_NAME, cpu_cores, ort_session


class OnnxFileRunner:
    """An ONNX file (fp32, fp16 or int8 QDQ) through ONNX Runtime's CPU provider."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.session = ort_session(path)

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(lr.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: x})[0])


class OpenVinoRunner:
    """An OpenVINO IR compiled for the CPU with a latency hint (one request, every core). Its float ops
    stay fp32: on a CPU with AVX512-BF16 or AMX OpenVINO would otherwise run them in bf16 (53 dB of
    parity instead of ~140 for a fp32 IR), and the format's name promises fp32."""

    def __init__(self, name: str, path: Path) -> None:
        import openvino as ov

        self.name = name
        core = ov.Core()
        self.compiled = core.compile_model(
            str(path),
            "CPU",
            {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": cpu_cores(),
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
        self._lock = threading.Lock()  # one infer request, shared by the threads that serve

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(lr.detach().cpu().numpy(), dtype=np.float32)
        with self._lock:
            out = self.compiled(x)[0]
        return torch.from_numpy(np.array(out, dtype=np.float32))


class NcnnRunner:
    """An NCNN .param/.bin through the ncnn Python runtime; fp16 storage and arithmetic for fp16 files."""

    def __init__(self, name: str, param: Path, weights: Path, fp16: bool) -> None:
        import ncnn

        self.name = name
        self.net = ncnn.Net()
        self.net.opt.num_threads = cpu_cores()
        self.net.opt.use_fp16_storage = fp16
        self.net.opt.use_fp16_packed = fp16
        self.net.opt.use_fp16_arithmetic = fp16
        if self.net.load_param(str(param)) or self.net.load_model(str(weights)):
            raise RuntimeError(f"ncnn could not load {param.name}")
        self.input, self.output = self.net.input_names()[0], self.net.output_names()[0]

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        import ncnn

        outputs = []
        for image in lr.detach().cpu().numpy().astype(np.float32):
            # clone(): the graph may work in place on its input, which must not be numpy's memory.
            mat = ncnn.Mat(np.ascontiguousarray(image)).clone()
            extractor = self.net.create_extractor()
            extractor.input(self.input, mat)
            status, out = extractor.extract(self.output)
            if status != 0:
                raise RuntimeError(f"ncnn inference failed ({status})")
            outputs.append(np.array(out, dtype=np.float32))
        return torch.from_numpy(np.stack(outputs))


class FixedSizeRunner:
    """A runner whose graph holds one input size (SwinIR's): any image is reflect-padded to at least
    that size and run as overlapping tiles of it, blended as core.infer.tiling blends any tiles."""

    def __init__(self, inner, tile: int, scale: int, overlap: int = 16) -> None:
        self.name, self.inner, self.tile, self.scale, self.overlap = inner.name, inner, tile, scale, overlap

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        from core.infer.tiling import upscale_tiled

        _, _, height, width = lr.shape
        if (height, width) == (self.tile, self.tile):
            return self.inner(lr)
        pad_h, pad_w = max(0, self.tile - height), max(0, self.tile - width)
        outputs = []
        for image in lr.detach().cpu().numpy().astype(np.float32):
            rgb = np.pad(image.transpose(1, 2, 0), ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
            sr = upscale_tiled(self.inner, np.ascontiguousarray(rgb), self.scale, self.tile, self.overlap)
            outputs.append(sr[: height * self.scale, : width * self.scale].transpose(2, 0, 1))
        return torch.from_numpy(np.ascontiguousarray(np.stack(outputs)))


def fit_to_model(model, runner):
    """`runner` as is, or tiled at the export size when the model's graphs hold one size (SwinIR); the
    fp32 reference of such a model is tiled alike, so that parity measures the format, not the tiles."""
    from core.export import EXPORT_LR_SIZE
    from core.models.network import model_config

    config = model_config(model)
    if config.onnx_dynamic_shapes:
        return runner
    return FixedSizeRunner(runner, EXPORT_LR_SIZE[0], config.scale)


def format_runner_for(model, name: str, directory: Path):
    """The runner of format `name` for `model` (see `fit_to_model`)."""
    return fit_to_model(model, format_runner(name, directory))


def format_runner(name: str, directory: Path):
    """The runner of format `name` from its files in `directory`."""
    spec = FORMATS[name]
    files = [Path(directory, file) for file in spec.files]
    if spec.runtime == "onnxruntime":
        return OnnxFileRunner(name, files[0])
    if spec.runtime == "openvino":
        return OpenVinoRunner(name, files[0])
    return NcnnRunner(name, files[0], files[1], fp16=spec.precision == "fp16")
