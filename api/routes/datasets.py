"""Datasets: zip/tar uploads of images with safe extraction, list/show/delete; ``sample`` always there.

Archives are never extracted with extractall. Each member is checked first: no absolute paths, no
``..``, no links or devices, at most MAX_FILES images and MAX_TOTAL_BYTES uncompressed, and every image
is decoded (pixel limit included) before anything is stored. Images are flattened to their base names
(core reads the images directly inside a folder). Hidden files and macOS ``__MACOSX`` entries are
skipped; any other non-image file is refused, so a wrong archive is caught instead of silently emptied.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.deps import Caller, Offset, Services, current_caller, get_services, read_session
from api.errors import ApiError, error_responses, not_found, user_error_status
from api.schemas import SAMPLE_DATASET_ID, DatasetOut, Page
from api.uploads import read_upload
from core.data.datasets import IMAGE_SUFFIXES
from core.data.images import read_image
from core.errors import ImageError
from store.blobs import BlobStore, join_key
from store.jobs import ACTIVE_STATES
from store.tables import Dataset, Job, new_id, utcnow

router = APIRouter(prefix="/v1", tags=["datasets"], responses=error_responses(401, 404, 409, 413, 422, 503))

MAX_FILES = 2000
MAX_TOTAL_BYTES = 1 << 30  # uncompressed, all images together
MAX_NAME_LENGTH = 200


class UnsafeArchive(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(422, "unsafe_archive", message)


def _check_member_name(name: str) -> str | None:
    """The image's base name, None to skip the member; raises UnsafeArchive for dangerous paths."""
    if "\\" in name or "\x00" in name:
        raise UnsafeArchive(f"archive member {name!r} has a backslash or NUL in its path")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and len(path.parts[0]) >= 2 and path.parts[0][1] == ":"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchive(f"archive member {name!r} points outside the archive ('..')")
    if any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
        return None
    base = path.name
    if Path(base).suffix.lower() not in IMAGE_SUFFIXES:
        raise ApiError(
            422,
            "not_an_image",
            f"archive member {name!r} is not an image ({', '.join(sorted(IMAGE_SUFFIXES))})",
        )
    if len(base) > MAX_NAME_LENGTH:
        raise ApiError(422, "bad_name", f"archive member name {base[:40]!r}... is too long")
    return base


def _zip_members(data: bytes) -> Iterator[tuple[str, int, Any]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:  # S_IFLNK: a symlink stored by Info-ZIP
                raise UnsafeArchive(f"archive member {info.filename!r} is a symbolic link")
            if mode not in (0, 0o100000):
                raise UnsafeArchive(f"archive member {info.filename!r} is not a regular file")
            yield info.filename, info.file_size, lambda info=info: archive.read(info)


def _tar_members(data: bytes) -> Iterator[tuple[str, int, Any]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        for member in archive:
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                raise UnsafeArchive(f"archive member {member.name!r} is a link")
            if not member.isfile():
                raise UnsafeArchive(f"archive member {member.name!r} is not a regular file")

            def read(member: tarfile.TarInfo = member) -> bytes:
                handle = archive.extractfile(member)
                assert handle is not None  # regular file
                return handle.read()

            yield member.name, member.size, read


def _members(data: bytes) -> Iterator[tuple[str, int, Any]]:
    if zipfile.is_zipfile(io.BytesIO(data)):
        return _zip_members(data)
    try:
        tarfile.open(fileobj=io.BytesIO(data), mode="r:*").close()
    except (tarfile.TarError, OSError, EOFError):
        raise ApiError(422, "invalid_archive", "the upload is not a zip or tar archive") from None
    return _tar_members(data)


def extract_images(data: bytes, max_pixels: int) -> dict[str, bytes]:
    """Checked images of an archive by base name; every member is validated before any is returned."""
    images: dict[str, bytes] = {}
    total = 0
    try:
        for name, size, read in _members(data):
            base = _check_member_name(name)
            if base is None:
                continue
            if base in images:
                raise ApiError(
                    422, "duplicate_name", f"two images are named {base!r} (folders are flattened)"
                )
            if len(images) >= MAX_FILES:
                raise ApiError(413, "too_many_files", f"the archive holds more than {MAX_FILES} images")
            total += size
            if total > MAX_TOTAL_BYTES:
                raise ApiError(
                    413, "archive_too_large", f"the images are over {MAX_TOTAL_BYTES:,} bytes uncompressed"
                )
            content = read()
            if len(content) != size:  # a header lying about the size must not slip past the limits
                raise UnsafeArchive(f"archive member {name!r} is not the size its header states")
            try:
                read_image(content, max_pixels=max_pixels)
            except ImageError as error:
                status, code = user_error_status(error)
                raise ApiError(status, code, f"archive member {name!r}: {error}") from None
            images[base] = content
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        raise ApiError(422, "invalid_archive", f"the archive is corrupt: {error}") from None
    if not images:
        raise ApiError(422, "no_images", "the archive holds no images")
    return images


# --- sample -------------------------------------------------------------------------------------------


def ensure_sample_dataset(services: Services) -> None:
    """The built-in ``sample`` dataset (core's bundled images), stored once like any other dataset."""
    from core.data.sample import sample_dir

    with services.read_sessions() as session:
        existing = session.get(Dataset, SAMPLE_DATASET_ID)
    prefix = join_key("datasets", SAMPLE_DATASET_ID)
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


def visible_dataset(session: Session, caller: Caller, dataset_id: str) -> Dataset:
    """The caller's live dataset or a built-in one, else 404."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.deleted_at is not None or row.owner_key_id not in (caller.key_id, None):
        raise not_found("dataset", dataset_id)
    return row


def dataset_in_use(session: Session, dataset_id: str) -> bool:
    # dataset_ids is a JSON list: filter in Python over the (few) active jobs rather than per dialect.
    rows = session.execute(select(Job.dataset_ids).where(Job.state.in_(ACTIVE_STATES))).scalars()
    return any(dataset_id in (ids or []) for ids in rows)


def store_images(blobs: BlobStore, prefix: str, images: dict[str, bytes]) -> None:
    for name, content in images.items():
        blobs.put_bytes(join_key(prefix, name), content)


# --- routes -------------------------------------------------------------------------------------------


@router.post("/datasets", status_code=201, response_model=DatasetOut, summary="Upload a zip or tar of images")
def upload_dataset(
    file: UploadFile = File(description="a .zip, .tar, .tar.gz or .tgz of PNG/JPEG/WebP/BMP/TIFF images"),
    name: str | None = Form(None, max_length=200),
    kind: str = Form("train", pattern="^(train|eval)$"),
    services: Services = Depends(get_services),
    caller: Caller = Depends(current_caller),
) -> Any:
    data = read_upload(file, services.settings.max_upload_bytes)
    images = extract_images(data, services.settings.max_pixels)
    dataset_id = new_id()
    prefix = join_key("datasets", dataset_id)
    try:
        store_images(services.blobs, prefix, images)
        row = Dataset(
            id=dataset_id,
            owner_key_id=caller.key_id,
            name=name or Path(file.filename or "dataset").name.split(".")[0] or "dataset",
            kind=kind,
            image_count=len(images),
            total_bytes=sum(len(content) for content in images.values()),
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
    limit: int = Query(50, ge=1, le=200),
    offset: Offset = 0,
    session: Session = Depends(read_session),
    caller: Caller = Depends(current_caller),
) -> Any:
    where = [
        or_(Dataset.owner_key_id == caller.key_id, Dataset.owner_key_id.is_(None)),
        Dataset.deleted_at.is_(None),
    ]
    return Page[DatasetOut].of_rows(session, Dataset, where, DatasetOut.of, limit, offset)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def show_dataset(
    dataset_id: str, session: Session = Depends(read_session), caller: Caller = Depends(current_caller)
) -> Any:
    return DatasetOut.of(visible_dataset(session, caller, dataset_id))


@router.delete(
    "/datasets/{dataset_id}", status_code=204, summary="Delete a dataset (409 while a live job uses it)"
)
def delete_dataset(
    dataset_id: str,
    services: Services = Depends(get_services),
    caller: Caller = Depends(current_caller),
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
