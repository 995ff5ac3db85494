"""The caller's rows: lookups that 404 for anything another key owns (ids are not probeable), in-use
checks before a delete, and the files of a stored model (materialized for a runner, or streamed).
Routes call these; they never call each other."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from core.models.config import CONFIG_FILE, WEIGHTS_FILE
from store.blobs import BlobNotFound, BlobStore
from store.jobs import ACTIVE_STATES
from store.tables import Dataset, Job, Model

if TYPE_CHECKING:
    from api.deps import Caller


def owned_model(session: Session, caller: Caller, model_id: str) -> Model:
    """The caller's live model or a built-in one, else 404."""
    row = session.get(Model, model_id)
    if row is None or row.deleted_at is not None or row.owner_key_id not in (caller.key_id, None):
        raise not_found("model", model_id)
    return row


def visible_dataset(session: Session, caller: Caller, dataset_id: str) -> Dataset:
    """The caller's live dataset or a built-in one, else 404."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.deleted_at is not None or row.owner_key_id not in (caller.key_id, None):
        raise not_found("dataset", dataset_id)
    return row


def owned_job(session: Session, caller: Caller, job_id: str) -> Job:
    row = session.get(Job, job_id)
    if row is None or row.owner_key_id != caller.key_id:
        raise not_found("job", job_id)
    return row


def model_in_use(session: Session, model_id: str) -> bool:
    """The model is the teacher of a queued or running job."""
    stmt = (
        select(func.count())
        .select_from(Job)
        .where(Job.teacher_model_id == model_id, Job.state.in_(ACTIVE_STATES))
    )
    return bool(session.execute(stmt).scalar_one())


def dataset_in_use(session: Session, dataset_id: str) -> bool:
    # dataset_ids is a JSON list: filter in Python over the (few) active jobs rather than per dialect.
    rows = session.execute(select(Job.dataset_ids).where(Job.state.in_(ACTIVE_STATES))).scalars()
    return any(dataset_id in (ids or []) for ids in rows)


def materialize_model(blobs: BlobStore, row: Model, directory: Path) -> Path:
    """Download a model's safetensors + config into ``directory`` (a srcompress model dir)."""
    if not row.weights_key or not row.config_key:
        raise ApiError(409, "model_incomplete", f"model {row.id} has no stored weights")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        blobs.download_to(row.weights_key, directory / WEIGHTS_FILE)
        blobs.download_to(row.config_key, directory / CONFIG_FILE)
    except BlobNotFound:
        raise ApiError(409, "model_incomplete", f"model {row.id}'s files are missing from storage") from None
    return directory


def stream_blob(blobs: BlobStore, key: str, filename: str, content_type: str) -> StreamingResponse:
    """A stored file as a download (404 when storage lost it)."""
    try:
        size = blobs.size(key)
        stream = blobs.open_stream(key)
    except BlobNotFound:
        raise ApiError(404, "not_found", f"file {filename} is missing from storage") from None

    def chunks() -> Any:
        with stream:
            yield from iter(lambda: stream.read(1 << 20), b"")

    headers = {"Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(size)}
    return StreamingResponse(chunks(), media_type=content_type, headers=headers)
