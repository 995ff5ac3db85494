"""Blob storage: model weights, datasets, job work dirs and artifacts, on a local directory or S3.

Keys are relative '/'-separated paths such as ``jobs/<id>/work/ckpt.pt``. They are validated the same
way on both backends (no ``..``, no absolute paths, no backslashes or control characters), so a key
that works locally also works on S3 and no key can escape the local root.

Prefixes name folders: ``list("jobs/1")`` and ``list("jobs/1/")`` both mean the keys under
``jobs/1/`` and never ``jobs/10/...`` (plain S3 prefixes would match both).
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from core.errors import UserError
from store.settings import Settings

MAX_KEY_LENGTH = 1024
CHUNK_BYTES = 1024 * 1024


class BlobKeyError(UserError):
    """A key or prefix that is not a safe relative path."""


class BlobNotFound(LookupError):
    """No blob under that key."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative blob key, else raise BlobKeyError."""
    if not isinstance(key, str) or not key:
        raise BlobKeyError("blob key must be a non-empty string")
    if len(key.encode("utf-8")) > MAX_KEY_LENGTH:
        raise BlobKeyError(f"blob key longer than {MAX_KEY_LENGTH} bytes")
    if key.startswith("/") or "\\" in key or any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise BlobKeyError(f"blob key {key!r} must be a relative path without backslashes or control chars")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts) or (len(parts[0]) > 1 and parts[0][1] == ":"):
        raise BlobKeyError(f"blob key {key!r} has an empty, '.', '..' or drive segment")
    return key


def normalize_prefix(prefix: str) -> str:
    """'' (everything) or a checked folder prefix that ends with '/'."""
    if prefix in ("", "/"):
        return ""
    return check_key(prefix.rstrip("/")) + "/"


def join_key(*parts: str) -> str:
    """Join key segments with '/' and check the result."""
    return check_key("/".join(part.strip("/") for part in parts if part.strip("/")))


def _write_file_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through a temp file beside it and a rename: no reader sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as tmp:
            write(tmp)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


class BlobStore(ABC):
    """Where the service keeps its files. All methods take checked keys (see ``check_key``)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str | None = None) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The blob's content; BlobNotFound if missing."""

    @abstractmethod
    def download_to(self, key: str, path: str | os.PathLike[str]) -> Path:
        """Write the blob to ``path`` (parents created, replaced atomically); BlobNotFound if missing."""

    @abstractmethod
    def open_stream(self, key: str) -> BinaryIO:
        """A readable binary stream of the blob (close it, or use ``with``); BlobNotFound if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; BlobNotFound if missing."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """All keys under the folder ``prefix``, sorted."""

    @abstractmethod
    def url_for(self, key: str, expires_seconds: int = 3600) -> str | None:
        """A time-limited download URL, or None when the caller has to stream the blob itself."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every blob under the folder ``prefix``; returns how many. An empty prefix is refused."""
        if not normalize_prefix(prefix):
            raise BlobKeyError("refusing to delete the whole store: give a non-empty prefix")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)


class LocalBlobStore(BlobStore):
    """Blobs as files under ``root``. Writes go through a temp file and an atomic rename, so readers
    never see a half-written blob; the temp files live in ``root/.incoming`` (outside the key space)."""

    INCOMING = ".incoming"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / self.INCOMING).mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == self.INCOMING:
            raise BlobKeyError(f"blob key {key!r}: {self.INCOMING}/ is reserved")
        path = self.root / key
        # A symlink inside the root could still point outside it.
        if not path.resolve().is_relative_to(self.root):
            raise BlobKeyError(f"blob key {key!r} resolves outside the store")
        return path

    def _write_atomically(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root / self.INCOMING)
        try:
            with os.fdopen(fd, "wb") as tmp:
                write(tmp)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._write_atomically(self._path(key), lambda out: out.write(data))

    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str | None = None) -> None:
        with open(path, "rb") as src:
            self._write_atomically(self._path(key), lambda out: shutil.copyfileobj(src, out, CHUNK_BYTES))

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def download_to(self, key: str, path: str | os.PathLike[str]) -> Path:
        with open(self._existing(key), "rb") as src:
            return _write_file_atomically(Path(path), lambda out: shutil.copyfileobj(src, out, CHUNK_BYTES))

    def open_stream(self, key: str) -> BinaryIO:
        return open(self._existing(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop folders the delete left empty, up to the root, so listings stay tidy.
        for parent in path.parents:
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def list(self, prefix: str = "") -> builtins.list[str]:
        folder = normalize_prefix(prefix)
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            if Path(dirpath) == self.root and self.INCOMING in dirnames:
                dirnames.remove(self.INCOMING)
            for name in filenames:
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def url_for(self, key: str, expires_seconds: int = 3600) -> str | None:
        return None


class _StreamingBodyReader(io.RawIOBase):
    """botocore's StreamingBody as a raw stream, so it can be buffered into an ordinary BinaryIO."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3BlobStore(BlobStore):
    """Blobs in one S3 bucket (AWS, MinIO, moto). The bucket is created if it is missing."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        create_bucket: bool = True,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.endpoint_url = endpoint_url
        config = Config(
            signature_version="s3v4",
            region_name=region,
            # Path-style addressing: custom endpoints (MinIO, moto) seldom have wildcard DNS.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"max_attempts": 5, "mode": "standard"},
            # Newer botocore adds CRC checksums by default, which several S3-compatible stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=config,
        )
        if create_bucket:
            self._ensure_bucket(region)

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    def _ensure_bucket(self, region: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if _error_code(error) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as error:
            if _error_code(error) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client.put_object(Bucket=self.bucket, Key=check_key(key), Body=data, **extra)

    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else None
        # upload_file switches to multipart uploads for large files.
        self.client.upload_file(os.fspath(path), self.bucket, check_key(key), ExtraArgs=extra)

    def get_bytes(self, key: str) -> bytes:
        with self.open_stream(key) as stream:
            return stream.read()

    def download_to(self, key: str, path: str | os.PathLike[str]) -> Path:
        self.size(key)  # BlobNotFound before any file is created
        return _write_file_atomically(
            Path(path), lambda out: self.client.download_fileobj(self.bucket, check_key(key), out)
        )

    def open_stream(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as error:
            raise _not_found_or(error, key) from error
        return io.BufferedReader(_StreamingBodyReader(response["Body"]), CHUNK_BYTES)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=check_key(key))["ContentLength"])
        except ClientError as error:
            raise _not_found_or(error, key) from error

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=check_key(key))

    def delete_prefix(self, prefix: str) -> int:
        if not normalize_prefix(prefix):
            raise BlobKeyError("refusing to delete the whole store: give a non-empty prefix")
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            delete = {"Objects": batch, "Quiet": True}
            response = self.client.delete_objects(Bucket=self.bucket, Delete=delete)
            if response.get("Errors"):
                first = response["Errors"][0]
                raise OSError(f"S3 could not delete {first.get('Key')}: {first.get('Message')}")
        return len(keys)

    def list(self, prefix: str = "") -> builtins.list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=normalize_prefix(prefix)):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def url_for(self, key: str, expires_seconds: int = 3600) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)}, ExpiresIn=expires_seconds
        )


def _error_code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _not_found_or(error: Any, key: str) -> Exception:
    if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
        return BlobNotFound(key)
    return error


def make_blob_store(settings: Settings) -> BlobStore:
    """The blob store that ``settings`` describe."""
    if settings.blob_backend == "s3":
        return S3BlobStore(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
            secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
            region=settings.s3_region,
        )
    assert settings.blob_dir is not None  # filled in by Settings
    return LocalBlobStore(settings.blob_dir)


def _relative_files(local_dir: Path) -> Iterator[tuple[Path, str]]:
    for dirpath, _dirnames, filenames in os.walk(local_dir):
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file():
                yield path, path.relative_to(local_dir).as_posix()


def upload_dir(
    store: BlobStore, local_dir: str | os.PathLike[str], prefix: str, *, delete_extra: bool = False
) -> builtins.list[str]:
    """Copy every file under ``local_dir`` to ``prefix/<relative path>``; returns the keys written.

    With ``delete_extra`` the folder becomes a mirror: keys under ``prefix`` that have no local file any
    more are deleted, after all uploads, so an interrupted sync leaves a superset, never a gap.
    """
    folder = normalize_prefix(prefix)
    if not folder:
        raise BlobKeyError("upload_dir needs a non-empty prefix")
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir} is not a directory")
    written = []
    for path, relative in _relative_files(local_dir):
        key = check_key(folder + relative)
        store.put_file(key, path)
        written.append(key)
    if delete_extra:
        keep = set(written)
        for key in store.list(folder):
            if key not in keep:
                store.delete(key)
    return written


def download_dir(store: BlobStore, prefix: str, local_dir: str | os.PathLike[str]) -> builtins.list[Path]:
    """Copy every blob under ``prefix`` to ``local_dir/<relative key>``; returns the files written."""
    folder = normalize_prefix(prefix)
    if not folder:
        raise BlobKeyError("download_dir needs a non-empty prefix")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in store.list(folder):
        # Keys written by someone else could still be unsafe; never let one escape local_dir.
        relative = check_key(key[len(folder) :])
        written.append(store.download_to(key, local_dir / relative))
    return written
