"""The deployable formats a model can be exported to, and the files each one is made of. No torch.

One table, read by the job contract (which formats a job may ask for), the quantize stage (what to
build), the store (which files a model has) and the API (what to offer for download and serving).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FormatName = Literal["onnx", "onnx_fp16", "onnx_int8", "openvino", "openvino_int8", "ncnn", "ncnn_fp16"]
Precision = Literal["fp32", "fp16", "int8"]
Runtime = Literal["onnxruntime", "openvino", "ncnn"]


@dataclass(frozen=True)
class FormatSpec:
    name: FormatName
    precision: Precision
    runtime: Runtime
    files: tuple[str, ...]  # the first one is what a runtime is pointed at

    @property
    def file(self) -> str:
        return self.files[0]


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("onnx", "fp32", "onnxruntime", ("model.onnx",)),
        FormatSpec("onnx_fp16", "fp16", "onnxruntime", ("model_fp16.onnx",)),
        FormatSpec("onnx_int8", "int8", "onnxruntime", ("model_int8.onnx",)),
        FormatSpec("openvino", "fp32", "openvino", ("model_openvino.xml", "model_openvino.bin")),
        FormatSpec(
            "openvino_int8", "int8", "openvino", ("model_openvino_int8.xml", "model_openvino_int8.bin")
        ),
        FormatSpec("ncnn", "fp32", "ncnn", ("model.ncnn.param", "model.ncnn.bin")),
        FormatSpec("ncnn_fp16", "fp16", "ncnn", ("model_fp16.ncnn.param", "model_fp16.ncnn.bin")),
    )
}
DEFAULT_FORMATS: tuple[FormatName, ...] = ("onnx",)
# How calibration picks int8 activation ranges (ONNX Runtime's CalibrationMethod names, lower-cased).
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
