"""Safe extraction of uploaded image archives (zip, tar, tar.gz): streamed to disk under byte caps.

Archives are never extracted with extractall. Each member is checked first: no absolute paths, no
``..``, no links or devices; hidden files and macOS ``__MACOSX`` entries are skipped and any other
non-image file is refused (a wrong archive is caught instead of silently emptied). Images are flattened
to their base names (core reads the images directly inside a folder).

Memory stays flat whatever an archive holds: each member is decompressed in chunks straight to a file,
counting the bytes actually written (never trusting the headers), and stops at once past the
per-member cap, the total cap, or a compression ratio no image archive has (a zip bomb). Every image is
then decoded from its file (pixel limit included) before the caller stores anything.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from api.errors import ApiError, user_error_status
from core.data.datasets import IMAGE_SUFFIXES
from core.data.images import read_image
from core.errors import ImageError

MAX_FILES = 2000
MAX_TOTAL_BYTES = 1 << 30  # uncompressed, all images together
MAX_MEMBER_BYTES = 64 << 20  # one image file: a 16 MP 24-bit BMP is 48 MiB
MAX_RATIO = 100  # uncompressed / archive bytes: PNG and JPEG hardly compress further; a bomb does
MAX_NAME_LENGTH = 200
CHUNK_BYTES = 1 << 20

Member = tuple[str, Callable[[], IO[bytes]]]  # (name in the archive, open its decompressed stream)


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


def _zip_members(data: bytes) -> Iterator[Member]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:  # S_IFLNK: a symlink stored by Info-ZIP
                raise UnsafeArchive(f"archive member {info.filename!r} is a symbolic link")
            if mode not in (0, 0o100000):
                raise UnsafeArchive(f"archive member {info.filename!r} is not a regular file")
            yield info.filename, lambda info=info: archive.open(info)


def _tar_members(data: bytes) -> Iterator[Member]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        for member in archive:
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                raise UnsafeArchive(f"archive member {member.name!r} is a link")
            if not member.isfile():
                raise UnsafeArchive(f"archive member {member.name!r} is not a regular file")
            yield member.name, lambda member=member: archive.extractfile(member)


def _members(data: bytes) -> Iterator[Member]:
    if zipfile.is_zipfile(io.BytesIO(data)):
        return _zip_members(data)
    try:
        tarfile.open(fileobj=io.BytesIO(data), mode="r:*").close()
    except (tarfile.TarError, OSError, EOFError):
        raise ApiError(422, "invalid_archive", "the upload is not a zip or tar archive") from None
    return _tar_members(data)


def _over_cap(name: str, written: int, total: int, archive_bytes: int) -> ApiError | None:
    """413 once a member, all members together, or their ratio to the archive pass a cap."""
    if written > MAX_MEMBER_BYTES:
        return ApiError(
            413, "member_too_large", f"archive member {name!r} is over {MAX_MEMBER_BYTES:,} bytes"
        )
    if total > MAX_TOTAL_BYTES:
        return ApiError(413, "archive_too_large", f"the images are over {MAX_TOTAL_BYTES:,} bytes")
    if total > max(MAX_RATIO * archive_bytes, 1 << 20):
        message = f"the archive expands over {MAX_RATIO}x its {archive_bytes:,} bytes: not an image archive"
        return ApiError(413, "archive_too_large", message)
    return None


def _copy_capped(source: IO[bytes], path: Path, name: str, total_before: int, archive_bytes: int) -> int:
    """Stream one member to `path`; its size, or 413 the moment a cap is passed (the file removed)."""
    written = 0
    with source, open(path, "wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            error = _over_cap(name, written, total_before + written, archive_bytes)
            if error is not None:
                out.close()
                path.unlink(missing_ok=True)
                raise error
            out.write(chunk)
    return written


def extract_images(data: bytes, max_pixels: int, into: Path) -> dict[str, Path]:
    """Every image of an archive, checked and written under `into` (a fresh folder the caller removes),
    by base name; every member is validated before any is returned."""
    images: dict[str, Path] = {}
    total = 0
    try:
        for name, open_member in _members(data):
            base = _check_member_name(name)
            if base is None:
                continue
            if base in images:
                raise ApiError(
                    422, "duplicate_name", f"two images are named {base!r} (folders are flattened)"
                )
            if len(images) >= MAX_FILES:
                raise ApiError(413, "too_many_files", f"the archive holds more than {MAX_FILES} images")
            path = into / f"{len(images):05d}{Path(base).suffix.lower()}"
            total += _copy_capped(open_member(), path, name, total, len(data))
            try:
                read_image(path, max_pixels=max_pixels)
            except ImageError as error:
                status, code = user_error_status(error)
                raise ApiError(status, code, f"archive member {name!r}: {error}") from None
            images[base] = path
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        raise ApiError(422, "invalid_archive", f"the archive is corrupt: {error}") from None
    if not images:
        raise ApiError(422, "no_images", "the archive holds no images")
    return images
