"""Registering a model: its files in blob storage and the row that points at them.

A model enters the service through two doors, an uploaded checkpoint (api) and a finished job's student
(worker); both go through `put_model_files` (the files of a saved model directory, under
`models/{id}/`) and `register_model` (the row, with the weights' sha256).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.models.config import CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE
from store.blobs import BlobStore
from store.keys import model_key
from store.tables import Model, utcnow

# The files of a model and the column holding each one's blob key.
MODEL_FILES = {WEIGHTS_FILE: "weights_key", CONFIG_FILE: "config_key", ONNX_FILE: "onnx_key"}
CONTENT_TYPES = {WEIGHTS_FILE: "application/octet-stream", CONFIG_FILE: "application/json"}
BINARY = "application/octet-stream"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def format_files(formats: list[dict[str, Any]] | None) -> list[str]:
    """The files of the formats that are offered (verified and within their floor)."""
    return [name for entry in formats or [] if entry.get("ok") for name in entry.get("files", [])]


def model_files(row: Model) -> dict[str, str | None]:
    """File name → blob key (None where the model has no such file): weights, config, fp32 ONNX, then
    the files of every offered format (core.formats), stored beside them under models/{id}/."""
    files = {name: getattr(row, column) for name, column in MODEL_FILES.items()}
    for name in format_files(row.formats):
        files.setdefault(name, model_key(row.id, name))
    return files


def put_model_files(
    blobs: BlobStore, model_id: str, model_dir: Path, formats: list[dict[str, Any]] | None = None
) -> dict[str, str]:
    """Upload the files of a saved model directory; returns {column: blob key}. The weights and the
    config are required; the ONNX graph is stored when present, and the files of offered `formats`."""
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if not (model_dir / required).is_file():
            raise FileNotFoundError(f"{model_dir} has no {required}")
    keys = {}
    for name, column in MODEL_FILES.items():
        if (model_dir / name).is_file():
            keys[column] = model_key(model_id, name)
            blobs.put_file(keys[column], model_dir / name, CONTENT_TYPES.get(name, BINARY))
    for name in format_files(formats):
        if name not in MODEL_FILES:
            blobs.put_file(model_key(model_id, name), model_dir / name, CONTENT_TYPES.get(name, BINARY))
    return keys


def register_model(
    session: Session, model_id: str, model_dir: Path, keys: dict[str, str], **fields: Any
) -> Model:
    """Add the row of a model whose files `put_model_files` stored (the caller's transaction commits)."""
    row = Model(
        id=model_id,
        weights_sha256=file_sha256(model_dir / WEIGHTS_FILE),
        created_at=utcnow(),
        **keys,
        **fields,
    )
    session.add(row)
    return row
