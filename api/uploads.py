"""Bounded reading of multipart uploads: nothing over the limit is kept, and the answer is a clear 413."""

from __future__ import annotations

from pathlib import Path

from fastapi import UploadFile

from api.errors import ApiError

CHUNK_BYTES = 1 << 20


def too_large(what: str, size: int | None, limit: int) -> ApiError:
    got = f" ({size:,} bytes)" if size is not None else ""
    return ApiError(
        413,
        "payload_too_large",
        f"{what}{got} is over the {limit:,}-byte upload limit",
        {"limit_bytes": limit},
    )


def save_upload(upload: UploadFile, destination: Path, limit: int) -> int:
    """Copy an upload to ``destination`` (parents created); 413 past ``limit`` bytes, 422 when empty."""
    if upload.size is not None and upload.size > limit:
        raise too_large("upload", upload.size, limit)
    destination.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    upload.file.seek(0)
    with open(destination, "wb") as out:
        while chunk := upload.file.read(CHUNK_BYTES):
            written += len(chunk)
            if written > limit:
                out.close()
                destination.unlink(missing_ok=True)
                raise too_large("upload", None, limit)
            out.write(chunk)
    if written == 0:
        destination.unlink(missing_ok=True)
        raise ApiError(422, "empty_upload", "the uploaded file is empty")
    return written


def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The upload's bytes; 413 past ``limit``, 422 when empty."""
    if upload.size is not None and upload.size > limit:
        raise too_large("upload", upload.size, limit)
    upload.file.seek(0)
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise too_large("upload", None, limit)
    if not data:
        raise ApiError(422, "empty_upload", "the uploaded file is empty")
    return data
