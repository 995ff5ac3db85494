"""The model zoo: EDSR, SwinIR and RLFN with official key names, presets and checkpoint I/O."""

from core.models.checkpoint import (
    LoadInfo,
    StateDictFile,
    detect_config,
    load_checkpoint,
    load_model,
    read_state_dict,
    save_model,
)
from core.models.config import (
    FAMILIES,
    SCALES,
    ArchTriple,
    EDSRConfig,
    ModelConfig,
    RLFNConfig,
    SwinIRConfig,
    parse_config,
)
from core.models.registry import (
    PRESETS,
    build_model,
    create_model,
    deep_feature_weights,
    describe_validation_error,
    preset_config,
)

__all__ = [
    "FAMILIES",
    "PRESETS",
    "SCALES",
    "ArchTriple",
    "EDSRConfig",
    "LoadInfo",
    "ModelConfig",
    "RLFNConfig",
    "StateDictFile",
    "SwinIRConfig",
    "build_model",
    "create_model",
    "deep_feature_weights",
    "describe_validation_error",
    "detect_config",
    "load_checkpoint",
    "load_model",
    "parse_config",
    "preset_config",
    "read_state_dict",
    "save_model",
]
