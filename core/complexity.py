"""Parameter and MAC counts under one stated convention (method.md §8).

Params: every nn.Parameter (`total`) and the same without SwinIR's relative-position-bias tables
(`excl_rpb`); buffers and constant mean shifts are not parameters. MACs: torch's FlopCounterMode over
one eval forward at batch 1, which counts conv, linear (mm/addmm) and bmm and reports FLOPs = 2 x MACs;
norms, softmax, activations and adds are not counted. By default the forward runs on the `meta`
device: shapes only, so even EDSR-L at 640x360 costs no memory or compute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from core.errors import UserError
from core.models.config import ModelConfig
from core.models.network import eval_mode
from core.results import Complexity

# LR input sizes (W, H) giving a 1280x720-ish output (method.md §8).
DEFAULT_LR_SIZES: dict[int, tuple[int, int]] = {2: (640, 360), 3: (427, 240), 4: (320, 180)}
RPB_PARAM_NAME = "relative_position_bias_table"
# aten op -> the op class reported in MacCount.by_op.
_OP_CLASSES = {
    "convolution": "conv",
    "_convolution": "conv",
    "convolution_backward": "conv",
    "mm": "linear",
    "addmm": "linear",
    "bmm": "bmm",
    "baddbmm": "bmm",
}


@dataclass(frozen=True)
class ParamCount:
    total: int
    excl_rpb: int


@dataclass(frozen=True)
class MacCount:
    macs: int
    flops: int
    by_op: dict[str, int]  # MACs per op class: conv, linear, bmm (others by aten name)
    lr_size: tuple[int, int]  # (W, H) of the LR input counted

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: nn.Module) -> ParamCount:
    total = excl_rpb = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if not name.endswith(RPB_PARAM_NAME):
            excl_rpb += param.numel()
    return ParamCount(total=total, excl_rpb=excl_rpb)


def default_lr_size(scale: int) -> tuple[int, int]:
    if scale not in DEFAULT_LR_SIZES:
        raise UserError(f"no default LR size for scale {scale}; choose one of {sorted(DEFAULT_LR_SIZES)}")
    return DEFAULT_LR_SIZES[scale]


def _meta_model(config: ModelConfig) -> nn.Module:
    """The config's architecture with shape-only tensors (no memory, no init cost)."""
    from core.models.build import build_model  # local: complexity stays importable on its own

    with torch.device("meta"):
        return build_model(config)


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same architecture with shape-only tensors: rebuilt from its config, else copied and moved."""
    config = getattr(model, "config", None)
    return _meta_model(config) if config is not None else copy.deepcopy(model).to("meta")


def count_macs(model: nn.Module, lr_size: tuple[int, int] | None = None, on_meta: bool = True) -> MacCount:
    """MACs of one forward at batch 1 for an LR input of lr_size = (W, H) (default: default_lr_size).

    on_meta=False runs the real model on its own device instead (same numbers, real cost).
    """
    if lr_size is None:
        lr_size = default_lr_size(model.config.scale)
    width, height = lr_size
    if on_meta:
        counted, device = _meta_copy(model), torch.device("meta")
    else:
        counted = model
        device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with eval_mode(counted), torch.no_grad(), counter:
        counted(torch.zeros(1, 3, height, width, device=device))

    by_op: dict[str, int] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[-1] if "." in str(op) else str(op)
        op_class = _OP_CLASSES.get(name, name)
        by_op[op_class] = by_op.get(op_class, 0) + flops // 2
    flops_total = counter.get_total_flops()
    return MacCount(macs=flops_total // 2, flops=flops_total, by_op=by_op, lr_size=(width, height))


def config_complexity(config: ModelConfig) -> Complexity:
    """Params and MACs at the default LR size for the config's scale, counted on shapes only (meta
    device)."""
    model = _meta_model(config)
    lr_size = default_lr_size(config.scale)
    params = count_params(model)
    return Complexity(
        params=params.total,
        params_excl_rpb=params.excl_rpb,
        macs=count_macs(model, lr_size).macs,
        lr_size=lr_size,
    )
