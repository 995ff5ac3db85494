"""Named presets (method.md §2.3, §2.5): each preset's architecture fields, and its config at a scale.

No torch here: the job contract (core.job) validates preset names without building anything.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from core.errors import UserError, describe_validation_error
from core.models.config import SCALES, EDSRConfig, ModelConfig, RLFNConfig, SwinIRConfig, parse_config

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
        raise UserError(
            f"bad override for preset {name!r}: {describe_validation_error(error.errors())}"
        ) from None
