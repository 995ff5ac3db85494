"""Building networks from configs, and the weight tensors the density d counts (method.md §3.3)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from core.errors import UserError
from core.models.config import EDSRConfig, ModelConfig, RLFNConfig, SwinIRConfig
from core.models.edsr import EDSR
from core.models.presets import preset_config
from core.models.rlfn import RLFN
from core.models.swinir import SwinIR


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised network for `config` (train mode); `model.config` is the config."""
    if isinstance(config, EDSRConfig):
        return EDSR(config)
    if isinstance(config, SwinIRConfig):
        return SwinIR(config)
    if isinstance(config, RLFNConfig):
        return RLFN(config)
    raise UserError(f"not a model config: {type(config).__name__}")


def create_model(name: str, scale: int, **overrides: Any) -> nn.Module:
    return build_model(preset_config(name, scale, **overrides))


def deep_feature_weights(model: nn.Module) -> dict[str, Tensor]:
    """The weight tensors counted in the density d (method.md §3.3), by parameter name.

    EDSR: the block convs and conv_after_body. SwinIR: every `.weight` inside the RSTBs (LayerNorms,
    qkv, proj, MLP, RSTB conv), no biases or RPB tables. RLFN: every conv weight in the blocks (ESA
    included) and conv_2. The returned tensors are the live parameters, not copies.
    """
    family = model.config.family

    def counted(name: str) -> bool:
        if not name.endswith(".weight"):
            return False
        if family == "edsr":
            return name.startswith("body.") or name == "conv_after_body.weight"
        if family == "swinir":
            return name.startswith("layers.")
        return name.startswith("block_") or name == "conv_2.weight"

    return {name: p for name, p in model.named_parameters() if counted(name)}
