"""Named presets (method.md §2.3, §2.5), building models from configs, and the density tensors (§3.3)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from torch import Tensor, nn

from core.errors import UserError
from core.models.config import SCALES, EDSRConfig, ModelConfig, RLFNConfig, SwinIRConfig, parse_config
from core.models.edsr import EDSR
from core.models.rlfn import RLFN
from core.models.swinir import SwinIR

# Architecture fields of each preset, without the scale (which every call states).
PRESETS: dict[str, dict[str, Any]] = {
    "edsr": {"family": "edsr", "num_feat": 256, "num_block": 32, "res_scale": 0.1},
    "edsr_baseline": {"family": "edsr", "num_feat": 64, "num_block": 16, "res_scale": 1.0},
    # The authors' student: res_scale 2 is in both their KD and test configs.
    "edsr_mini": {"family": "edsr", "num_feat": 16, "num_block": 8, "res_scale": 2.0},
    "swinir": {
        "family": "swinir",
        "embed_dim": 180,
        "depths": (6,) * 6,
        "num_heads": (6,) * 6,
        "upsampler": "pixelshuffle",
    },
    "swinir_lightweight": {
        "family": "swinir",
        "embed_dim": 60,
        "depths": (6,) * 4,
        "num_heads": (6,) * 4,
        "upsampler": "pixelshuffledirect",
    },
    "swinir_mini": {
        "family": "swinir",
        "embed_dim": 24,
        "depths": (4,) * 3,
        "num_heads": (6,) * 3,
        "upsampler": "pixelshuffledirect",
    },
    "rlfn": {"family": "rlfn", "channels": 52, "num_blocks": 6, "convs_per_block": 3},
    "rlfn_s": {"family": "rlfn", "channels": 48, "num_blocks": 6, "convs_per_block": 3},
}

_CONFIG_TYPES: dict[str, type[EDSRConfig | SwinIRConfig | RLFNConfig]] = {
    "edsr": EDSRConfig,
    "swinir": SwinIRConfig,
    "rlfn": RLFNConfig,
}


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad field and pydantic's reason."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "config"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def preset_config(name: str, scale: int, **overrides: Any) -> ModelConfig:
    """The config of preset `name` at `scale`, with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    if scale not in SCALES:
        raise UserError(f"scale {scale!r} is not supported; choose one of: {', '.join(map(str, SCALES))}")
    fields = PRESETS[name]
    config_type = _CONFIG_TYPES[fields["family"]]
    valid = sorted(set(config_type.model_fields) - {"family", "scale"})
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise UserError(
            f"preset {name!r} has no field {', '.join(unknown)}; valid overrides: {', '.join(valid)}"
        )
    try:
        return parse_config({**fields, "scale": scale, **overrides})
    except ValidationError as error:
        raise UserError(f"bad override for preset {name!r}: {describe_validation_error(error)}") from None


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
