"""Facts about a built network that every consumer needs: its family, its device, and a block that
runs it in eval mode and restores the mode it had."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from core.models.config import BaseConfig


def model_family(model: nn.Module) -> str:
    """'edsr', 'swinir' or 'rlfn' from the model's config ('unknown' for a plain module)."""
    return str(getattr(getattr(model, "config", None), "family", "unknown"))


def model_config(model: nn.Module) -> BaseConfig:
    """The model's architecture config, which declares its family's inference facts (padding, fp16
    safety, ...); a module built outside core.models gets the defaults of a plain conv net."""
    config = getattr(model, "config", None)
    return config if isinstance(config, BaseConfig) else BaseConfig()


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
