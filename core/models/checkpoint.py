"""Reading official checkpoints, detecting their architecture, and srcompress's own model format.

Official files are pickles read with `torch.load(weights_only=True)`, so a file that needs code to
unpickle is refused, never run. srcompress saves `model.safetensors` + `config.json` (method.md §2.4).
Canonical key names are BasicSR's/SwinIR's/RLFN's; EDSR-PyTorch names are converted on read.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.errors import CheckpointError, UserError, describe_validation_error
from core.models import edsr, rlfn, swinir
from core.models.build import build_model
from core.models.config import (
    CONFIG_FILE,
    FAMILIES,
    SCALES,
    WEIGHTS_FILE,
    EDSRConfig,
    ModelConfig,
    SwinIRConfig,
    parse_config,
)
from core.models.presets import PRESETS, preset_config

# Wrappers BasicSR/KAIR put around a state_dict, most preferred first.
WRAPPERS = ("params_ema", "params")
# Buffers SwinIR recomputes from its config; a checkpoint may omit them (method.md §2.4).
DETERMINISTIC_BUFFERS = ("relative_position_index", "attn_mask")

Wrapper = Literal["params_ema", "params", "raw", "safetensors"]
KeyScheme = Literal["official", "edsr-pytorch", "srcompress"]


@dataclass
class StateDictFile:
    """Tensors read from a checkpoint file, in canonical key names, and how they were found."""

    tensors: dict[str, Tensor]
    wrapper: Wrapper
    key_scheme: KeyScheme
    notes: list[str] = field(default_factory=list)


class LoadInfo(BaseModel):
    """What load_checkpoint found and decided; JSON-serialisable for job records."""

    model_config = ConfigDict(frozen=True)

    source: str
    config: ModelConfig
    wrapper: Wrapper
    key_scheme: KeyScheme
    notes: list[str] = []


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> StateDictFile:
    """Tensors of a .pth/.pt/.safetensors file, unwrapped (params_ema > params > raw) and renamed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        tensors, wrapper = _read_safetensors(path), "safetensors"
    else:
        tensors, wrapper = _unwrap(_torch_load(path), path)
    notes: list[str] = []
    if wrapper in WRAPPERS:
        notes.append(f"weights taken from the {wrapper!r} entry")
    if tensors and all(key.startswith("module.") for key in tensors):
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
        notes.append("stripped the DataParallel 'module.' prefix")
    key_scheme: KeyScheme = "official"
    if "head.0.weight" in tensors:
        tensors, key_scheme = edsr.from_edsr_pytorch(tensors), "edsr-pytorch"
        notes.append("converted EDSR-PyTorch key names to BasicSR's")
    return StateDictFile(tensors, wrapper, key_scheme, notes)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for non-checkpoints; none may escape raw
        message = str(error).lower()
        if "unsupported global" in message:  # the pickle names a class or function to call
            reason = "it needs arbitrary code to unpickle (only plain tensors are accepted)"
        elif "weights only load failed" in message:
            reason = "the safe unpickler refused it (only torch.save files of plain tensors are accepted)"
        elif path.stat().st_size == 0:
            reason = "the file is empty"
        elif not zipfile.is_zipfile(path):
            # Outside torch's zip format torch's own message is noise (a byte value, a codec error).
            reason = "not a file written by torch.save (neither its zip format nor a legacy pickle)"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read {path.name} as a PyTorch checkpoint: {reason}") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path.name} as safetensors: {error}") from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Tensor], Wrapper]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a state_dict")
    wrapper: Wrapper = "raw"
    for key in WRAPPERS:
        if key in obj:
            obj, wrapper = obj[key], key
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path.name} holds no tensors under {wrapper!r}")
    not_tensors = [key for key, value in obj.items() if not isinstance(value, Tensor)]
    if not_tensors:
        first = not_tensors[0]
        raise CheckpointError(
            f"{path.name} is not a state_dict: {first!r} holds a {type(obj[first]).__name__}"
            f" (expected tensors, optionally under {' or '.join(WRAPPERS)})"
        )
    return dict(obj), wrapper


# --------------------------------------------------------------------------- detection


def detect_config(state_dict: dict[str, Tensor]) -> ModelConfig:
    """The family and every hyper-parameter (scale included) a state_dict's keys and shapes imply."""
    return _detect(state_dict)[0]


def _detect(sd: dict[str, Tensor]) -> tuple[ModelConfig, list[str]]:
    try:
        for family in (rlfn, swinir, edsr):  # each architecture reads its own keys (as spandrel does)
            if family.matches(sd):
                return family.detect(sd)
    except KeyError as missing:
        raise CheckpointError(f"checkpoint is incomplete: it lacks {missing.args[0]}") from None
    except IndexError:
        raise CheckpointError("checkpoint tensors have shapes no supported architecture uses") from None
    except ValidationError as error:
        raise CheckpointError(
            f"checkpoint shapes give an invalid config: {describe_validation_error(error.errors())}"
        ) from None
    sample = ", ".join(list(sd)[:5])
    raise CheckpointError(
        "unrecognised architecture: expected EDSR (conv_first, body.0.conv1), SwinIR (conv_first, "
        f"layers.0.residual_group...) or RLFN (conv_1, block_1.c5) keys; found {sample}, ..."
    )


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | Path, family: str | None = None, scale: int | None = None, preset: str | None = None
) -> tuple[nn.Module, LoadInfo]:
    """A model (eval mode) from an official checkpoint, a srcompress directory or a .safetensors file.

    family/scale/preset are what the caller expects; a file that contradicts them is refused. The
    architecture comes from the file (config.json, or detection from shapes); a preset supplies what
    shapes cannot tell (EDSR res_scale) and its shapes must then fit the file.
    """
    path = Path(path)
    if family is not None and family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    if scale is not None and scale not in SCALES:
        raise UserError(f"scale {scale!r} is not supported; choose one of: {', '.join(map(str, SCALES))}")
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if preset is not None and family is not None and PRESETS[preset]["family"] != family:
        raise UserError(f"preset {preset!r} is a {PRESETS[preset]['family']} model, not {family}")

    config_path = _config_beside(path)
    if config_path is not None:
        weights = path / WEIGHTS_FILE if path.is_dir() else path
        config = _read_config(config_path)
        contents = StateDictFile(_read_safetensors_required(weights), "safetensors", "srcompress")
        notes = [f"architecture from {config_path.name}"]
    elif path.is_dir():
        raise CheckpointError(
            f"{path} is a directory without {CONFIG_FILE} (expected a srcompress model directory)"
        )
    else:
        contents = read_state_dict(path)
        config, notes = _detect(contents.tensors)
        notes = contents.notes + notes

    _check_expectations(config, family, scale, preset, path)
    if preset is not None and config_path is None:
        config = _preset_fitted_to_file(preset, config)
        notes = [note for note in notes if not note.startswith("res_scale")] + [
            f"hyper-parameters from preset {preset!r}"
        ]

    model = build_model(config)
    notes += _load_tensors(model, contents.tensors, config)
    model.eval()
    info = LoadInfo(
        source=str(path), config=config, wrapper=contents.wrapper, key_scheme=contents.key_scheme, notes=notes
    )
    return model, info


def _config_beside(path: Path) -> Path | None:
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return path / CONFIG_FILE
    if path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).is_file():
        return path.parent / CONFIG_FILE
    return None


def _read_config(config_path: Path) -> ModelConfig:
    try:
        return parse_config(config_path.read_text())
    except ValidationError as error:
        raise CheckpointError(
            f"{config_path} is not a valid model config: {describe_validation_error(error.errors())}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {config_path}: {error}") from None


def _read_safetensors_required(weights: Path) -> dict[str, Tensor]:
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights}")
    return _read_safetensors(weights)


def _check_expectations(
    config: ModelConfig, family: str | None, scale: int | None, preset: str | None, path: Path
) -> None:
    expected_family = family or (PRESETS[preset]["family"] if preset else None)
    if expected_family is not None and config.family != expected_family:
        wanted = f"preset {preset!r} ({expected_family})" if family is None else expected_family
        raise CheckpointError(f"{path.name} holds a {config.family} model, not {wanted}")
    if scale is not None and config.scale != scale:
        raise CheckpointError(f"{path.name} is a x{config.scale} model, but x{scale} was requested")


def _preset_fitted_to_file(preset: str, detected: ModelConfig) -> ModelConfig:
    """The preset's config at the file's scale, keeping what only the file knows (img_size, mean convs)."""
    config = preset_config(preset, detected.scale)
    if isinstance(config, SwinIRConfig) and isinstance(detected, SwinIRConfig):
        return config._rebuilt(img_size=detected.img_size)
    if isinstance(config, EDSRConfig) and isinstance(detected, EDSRConfig):
        return config._rebuilt(mean_convs=detected.mean_convs)
    return config


def _load_tensors(model: nn.Module, tensors: dict[str, Tensor], config: ModelConfig) -> list[str]:
    """Strict load; a mismatch raises CheckpointError listing missing/unexpected keys and shape conflicts."""
    expected = model.state_dict()
    recomputable = [k for k in expected if k not in tensors and k.rsplit(".", 1)[-1] in DETERMINISTIC_BUFFERS]
    missing = [k for k in expected if k not in tensors and k not in recomputable]
    unexpected = [k for k in tensors if k not in expected]
    conflicts = [
        f"{k} {tuple(tensors[k].shape)} in file vs {tuple(expected[k].shape)} in model"
        for k in tensors
        if k in expected and tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or conflicts:
        problems = [
            _listed(f"{len(missing)} missing", missing),
            _listed(f"{len(unexpected)} unexpected", unexpected),
            _listed(f"{len(conflicts)} shape conflicts", conflicts),
        ]
        summary = "; ".join(p for p in problems if p)
        raise CheckpointError(f"checkpoint does not fit {_describe(config)}: {summary}")
    model.load_state_dict(tensors, strict=not recomputable)
    return (
        [f"rebuilt {len(recomputable)} deterministic SwinIR buffers absent from the file"]
        if recomputable
        else []
    )


def _listed(label: str, keys: list[str], limit: int = 4) -> str:
    if not keys:
        return ""
    more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
    return f"{label} ({', '.join(keys[:limit])}{more})"


def _describe(config: ModelConfig) -> str:
    fields = config.model_dump(exclude={"family"})
    return f"{config.family} " + ", ".join(f"{k}={v}" for k, v in fields.items())


# --------------------------------------------------------------------------- srcompress format


def save_model(model: nn.Module, directory: str | Path) -> Path:
    """Write `model.safetensors` and `config.json` into directory (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: ModelConfig | None = getattr(model, "config", None)
    if config is None:
        raise UserError("save_model needs a srcompress model (one with a .config); got a plain module")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    # Write to temporary names, then rename, so a crash never leaves a half-written model behind.
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as handle:
        tmp_weights = Path(handle.name)
    save_file(tensors, tmp_weights, metadata={"format": "srcompress", "family": config.family})
    os.replace(tmp_weights, directory / WEIGHTS_FILE)
    tmp_config = directory / f"{CONFIG_FILE}.tmp"
    tmp_config.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp_config, directory / CONFIG_FILE)
    return directory


def load_model(directory: str | Path) -> nn.Module:
    """The model saved by save_model, in eval mode."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; not a srcompress model directory")
    return load_checkpoint(directory)[0]
