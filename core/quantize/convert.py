"""Convert a model to each deployable format (core.formats) with the well-kept tool for it.

- ONNX fp16: ONNX Runtime's float16 converter, inputs and outputs kept fp32 (callers and runtimes feed
  fp32); SwinIR as mixed precision (attention, LayerNorm and softmax in fp32).
- ONNX int8: ONNX Runtime static quantization, QDQ, per-channel symmetric int8 weights, asymmetric
  uint8 activations calibrated on LR patches, convs only (element-wise ops stay float). Which convs:
  `int8_convs` — the body's 3×3 width→width convs, which carry most of the MACs, except the first
  few and the last one. Measured on RLFN-S ×2 (Set5, cost = fp32 PSNR-Y − int8's): every conv int8
  14.9 dB; all but the head and tail 0.61; also the first block's, the 1×1 and attention-branch
  convs float 0.060 (minmax) / 0.052 (percentile) — error piles up along the residual chain, and
  the early layers and the narrow branches are where 8 bits hurt most.
- OpenVINO: the ONNX graph read by OpenVINO's converter, saved as IR (.xml + .bin) in fp32; int8 by
  NNCF post-training quantization on the same patches, of the same convs.
- NCNN: pnnx from TorchScript (from the ONNX file pnnx loses RLFN's size-following interpolation to
  un-convertible expressions), with two input shapes so that every size stays dynamic.

Each function writes its files (named by core.formats) into `out_dir` and returns nothing; failures
raise, and the quantize stage records them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from core.formats import FORMATS

PERCENTILE = 99.999  # the activation range keeps this percentile of calibration values (percentile)


def conv_nodes(path: Path) -> list[str]:
    """Names of the Conv nodes of an ONNX graph, in graph (topological) order."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [node.name for node in graph.node if node.op_type == "Conv"]


LEADING_FLOAT_CONVS = 3  # body convs nearest the input that stay float (a block's worth in RLFN)


def int8_convs(path: Path) -> list[str]:
    """The convs both int8 paths quantize: 3×3 convs from the body width to itself (the width most
    3×3 convs have), in graph order, without the first LEADING_FLOAT_CONVS and the last."""
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    square = [
        (node.name, shapes[node.input[1]][0])
        for node in graph.node
        if node.op_type == "Conv"
        and len(shapes.get(node.input[1], ())) == 4
        and shapes[node.input[1]][2:] == (3, 3)
        and shapes[node.input[1]][0] == shapes[node.input[1]][1]
    ]
    if not square:
        return []
    widths = [width for _, width in square]
    body = max(set(widths), key=widths.count)
    convs = [name for name, width in square if width == body]
    return convs[LEADING_FLOAT_CONVS:-1]


# Ops a transformer keeps in fp32 in its fp16 graph: attention scores and softmax overflow fp16, and so
# do LayerNorm's sums of squares (SwinIR's activations reach ~1e5).
MIXED_FP32_OPS = ("MatMul", "Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Div", "Erf")


def to_onnx_fp16(onnx_fp32: Path, out_dir: Path, mixed: bool = False) -> None:
    """fp16 weights and arithmetic; `mixed`: attention, LayerNorm and softmax kept fp32 (SwinIR)."""
    # ONNX Runtime's fork of onnxconverter-common's converter: the original mistypes the boundaries of
    # blocked ops (an fp16 bias added to an fp32 MatMul output in SwinIR's attention).
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny weights flushed to fp16's smallest normal, as intended
        converted = convert_float_to_float16(
            onnx.load(str(onnx_fp32)),
            keep_io_types=True,
            op_block_list=list(MIXED_FP32_OPS) if mixed else None,
        )
    onnx.save(converted, str(out_dir / FORMATS["onnx_fp16"].file))


class _PatchReader:
    """ONNX Runtime's calibration reader over LR patches, one patch per batch."""

    def __init__(self, patches: np.ndarray, input_name: str) -> None:
        self.items = iter([{input_name: patch[None]} for patch in patches])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def to_onnx_int8(onnx_fp32: Path, out_dir: Path, patches: np.ndarray, method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from core.onnx_export import INPUT_NAME

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="srcompress-int8-") as tmp:
        prepared = Path(tmp, "prepared.onnx")
        quant_pre_process(str(onnx_fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_dir / FORMATS["onnx_int8"].file),
            _PatchReader(patches, INPUT_NAME),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],
            nodes_to_quantize=int8_convs(prepared),
            calibrate_method=methods[method],
            extra_options={"CalibPercentile": PERCENTILE, "WeightSymmetric": True},
            calibration_cache_path=None,
        )


def read_openvino(onnx_fp32: Path):
    """The ONNX graph as an OpenVINO model (read_model: convert_model would split a path at commas)."""
    import openvino as ov

    return ov.Core().read_model(str(onnx_fp32))


def to_openvino(onnx_fp32: Path, out_dir: Path) -> None:
    import openvino as ov

    spec = FORMATS["openvino"]
    ov.save_model(read_openvino(onnx_fp32), str(out_dir / spec.file), compress_to_fp16=False)


def to_openvino_int8(onnx_fp32: Path, out_dir: Path, patches: np.ndarray) -> None:
    import nncf
    import openvino as ov

    model = read_openvino(onnx_fp32)
    chosen = set(int8_convs(onnx_fp32))
    # OpenVINO names a conv after its ONNX node (+ "/WithoutBiases"); every other conv stays float, and
    # so do the element-wise ops (as on the ONNX Runtime path).
    convs = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "Convolution"]
    ignored = nncf.IgnoredScope(
        names=[name for name in convs if name.removesuffix("/WithoutBiases") not in chosen],
        types=["Add", "Multiply", "Subtract", "Divide", "MatMul"],
        validate=False,
    )
    quantized = nncf.quantize(
        model,
        nncf.Dataset([patch[None] for patch in patches]),
        preset=nncf.QuantizationPreset.MIXED,  # asymmetric activations, symmetric weights
        subset_size=len(patches),
        ignored_scope=ignored,
    )
    ov.save_model(quantized, str(out_dir / FORMATS["openvino_int8"].file), compress_to_fp16=False)


def to_ncnn(model: nn.Module, out_dir: Path, fp16: bool) -> None:
    import pnnx

    spec = FORMATS["ncnn_fp16" if fp16 else "ncnn"]
    with tempfile.TemporaryDirectory(prefix="srcompress-ncnn-") as tmp:
        example = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's deprecation and size-check warnings
            traced = torch.jit.trace(model.cpu().eval(), example, check_trace=False)
        traced.save(str(Path(tmp, "model.pt")))
        done = subprocess.run(
            [
                pnnx.EXEC_PATH,
                "model.pt",
                "inputshape=[1,3,48,64]",
                "inputshape2=[1,3,60,80]",  # a second shape: pnnx keeps H and W dynamic
                f"fp16={int(fp16)}",
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
        param, weights = Path(tmp, "model.ncnn.param"), Path(tmp, "model.ncnn.bin")
        if done.returncode != 0 or not param.is_file():
            raise RuntimeError(f"pnnx failed ({done.returncode}): {done.stderr.strip()[-400:]}")
        shutil.move(param, out_dir / spec.files[0])
        shutil.move(weights, out_dir / spec.files[1])
