"""Datasets: zip/tar uploads of images (extracted safely by api.archives), list/show/delete; the
built-in ``sample`` set is always there."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from sqlalchemy import or_
from sqlalchemy.orm import Session

from api.archives import extract_images
from api.crud import dataset_in_use, visible_dataset
from api.deps import (
    Caller,
    CurrentCaller,
    Offset,
    ReadSession,
    Services,
    ServicesDep,
)
from api.errors import ApiError, error_responses
from api.schemas import SAMPLE_DATASET_ID, DatasetOut, Page
from api.uploads import read_upload
from store.blobs import BlobStore, join_key
from store.keys import dataset_prefix
from store.tables import Dataset, new_id, utcnow

router = APIRouter(
    prefix="/v1", tags=["datasets"], responses=error_responses(400, 401, 404, 409, 413, 422, 503)
)

# --- sample -------------------------------------------------------------------------------------------


def ensure_sample_dataset(services: Services) -> None:
    """The built-in ``sample`` dataset (core's bundled images), stored once like any other dataset."""
    from core.data.sample import sample_dir

    with services.read_sessions() as session:
        existing = session.get(Dataset, SAMPLE_DATASET_ID)
    prefix = dataset_prefix(SAMPLE_DATASET_ID)
    if existing is not None and services.blobs.list(prefix):
        return
    folder = sample_dir(services.settings.data_dir / "cache")
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    for path in paths:
        services.blobs.put_file(join_key(prefix, path.name), path, "image/png")
    if existing is None:
        try:
            with services.sessions.begin() as session:
                session.add(
                    Dataset(
                        id=SAMPLE_DATASET_ID,
                        owner_key_id=None,
                        name="sample",
                        kind="train",
                        image_count=len(paths),
                        total_bytes=sum(p.stat().st_size for p in paths),
                        blob_prefix=prefix + "/",
                        created_at=utcnow(),
                    )
                )
        except Exception:  # another API process inserted it first
            with services.read_sessions() as session:
                if session.get(Dataset, SAMPLE_DATASET_ID) is None:
                    raise


# --- helpers ------------------------------------------------------------------------------------------


def store_images(blobs: BlobStore, prefix: str, images: dict[str, Path]) -> None:
    for name, path in images.items():
        blobs.put_file(join_key(prefix, name), path)


# --- routes -------------------------------------------------------------------------------------------


@router.post("/datasets", status_code=201, response_model=DatasetOut, summary="Upload a zip or tar of images")
def upload_dataset(
    services: ServicesDep,
    caller: CurrentCaller,
    file: UploadFile = File(description="a .zip, .tar, .tar.gz or .tgz of PNG/JPEG/WebP/BMP/TIFF images"),
    name: str | None = Form(None, max_length=200),
    kind: str = Form("train", pattern="^(train|eval)$"),
) -> Any:
    data = read_upload(file, services.settings.max_upload_bytes)
    with tempfile.TemporaryDirectory(prefix="srcompress-dataset-") as tmp:
        images = extract_images(data, services.settings.max_pixels, Path(tmp))
        return _store_dataset(services, caller, images, name or _name_of(file), kind)


def _name_of(file: UploadFile) -> str:
    return Path(file.filename or "dataset").name.split(".")[0] or "dataset"


def _store_dataset(
    services: Services, caller: Caller, images: dict[str, Path], name: str, kind: str
) -> DatasetOut:
    dataset_id = new_id()
    prefix = dataset_prefix(dataset_id)
    try:
        store_images(services.blobs, prefix, images)
        row = Dataset(
            id=dataset_id,
            owner_key_id=caller.key_id,
            name=name,
            kind=kind,
            image_count=len(images),
            total_bytes=sum(path.stat().st_size for path in images.values()),
            blob_prefix=prefix + "/",
            created_at=utcnow(),
        )
        with services.sessions.begin() as session:
            session.add(row)
    except Exception:
        services.blobs.delete_prefix(prefix)
        raise
    return DatasetOut.of(row)


@router.get(
    "/datasets", response_model=Page[DatasetOut], summary="The caller's datasets and the built-in ones"
)
def list_datasets(
    session: ReadSession,
    caller: CurrentCaller,
    limit: int = Query(50, ge=1, le=200),
    offset: Offset = 0,
) -> Any:
    where = [
        or_(Dataset.owner_key_id == caller.key_id, Dataset.owner_key_id.is_(None)),
        Dataset.deleted_at.is_(None),
    ]
    return Page[DatasetOut].of_rows(session, Dataset, where, DatasetOut.of, limit, offset)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def show_dataset(
    dataset_id: str,
    session: ReadSession,
    caller: CurrentCaller,
) -> Any:
    return DatasetOut.of(visible_dataset(session, caller, dataset_id))


@router.delete(
    "/datasets/{dataset_id}", status_code=204, summary="Delete a dataset (409 while a live job uses it)"
)
def delete_dataset(
    dataset_id: str,
    services: ServicesDep,
    caller: CurrentCaller,
) -> Response:
    # Committed before the 204 is sent (a yield dependency may commit after it): a following GET sees it.
    with services.sessions.begin() as session:
        return _delete_dataset(session, services, caller, dataset_id)


def _delete_dataset(session: Session, services: Services, caller: Caller, dataset_id: str) -> Response:
    row = visible_dataset(session, caller, dataset_id)
    if row.owner_key_id is None:
        raise ApiError(409, "builtin", f"dataset {dataset_id} is built in and cannot be deleted")
    if dataset_in_use(session, dataset_id):
        raise ApiError(409, "in_use", f"dataset {dataset_id} is used by a queued or running job")
    row.deleted_at = utcnow()
    session.flush()
    services.blobs.delete_prefix(row.blob_prefix)
    return Response(status_code=204)
