"""Errors that a user caused and can fix. The CLI prints them as one line; the API maps them to 4xx."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Any


class UserError(ValueError):
    """Bad input: an unknown preset, a missing file, a checkpoint that does not fit, ..."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded into the requested or detected architecture."""


class ImageError(UserError):
    """A file that is not a decodable image, or one over the size limits."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit (the service's, or Pillow's decompression-bomb guard)."""


class Canceled(Exception):
    """Raised inside a stage when the caller's should_cancel() turned true."""


class Diverged(Exception):
    """A training loss stopped being finite (the lr or the loss weights are too large for the model)."""


def describe_validation_error(
    errors: Iterable[Mapping[str, Any]],
    skip: Container[Any] = (),
    limit: int | None = None,
    whole: str = "config",
) -> str:
    """One line naming each bad field and pydantic's reason, from `ValidationError.errors()`: location
    parts in `skip` are left out (the API's "body"), an error of the whole object is named `whole`, and
    past `limit` items, "(+N more)"."""
    items = list(errors)
    parts = []
    for item in items[:limit]:
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in skip) or whole
        parts.append(f"{where}: {item.get('msg', '')}")
    more = f" (+{len(items) - limit} more)" if limit is not None and len(items) > limit else ""
    return "; ".join(parts) + more


def validated(config_class: Any, **fields: Any) -> Any:
    """`config_class(**fields)` (pydantic); a bad value is a UserError of one line naming the field."""
    from pydantic import ValidationError

    try:
        return config_class(**fields)
    except ValidationError as error:
        raise UserError(describe_validation_error(error.errors())) from None
