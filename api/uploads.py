"""Bounded uploads: request bodies counted as they stream in, and bounded reading of the files in them.

`BodyLimit` is an ASGI middleware: a request whose Content-Length is over the limit is refused before a
byte of its body is read, and one without a length (chunked) is cut off the moment the bytes received
pass the limit, so no over-limit body is ever spooled to memory or disk. Either way the answer is 413.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException, UploadFile

from api.errors import ApiError, error_response

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


class BodyTooLarge(HTTPException):
    """Raised from inside the body stream; an HTTPException so that FastAPI's body parsing passes it
    on unchanged (it turns other errors into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the {limit:,}-byte limit", {"Connection": "close"})


class BodyLimit:
    """ASGI middleware: at most `limit()` body bytes per request (None: no limit yet, e.g. during start)."""

    def __init__(self, app: Any, limit: Callable[[Any], int | None]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        limit = self.limit(scope["app"]) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            # Refused before reading the body: nothing over the limit is buffered.
            message = f"request body of {int(length):,} bytes is over the {limit:,}-byte upload limit"
            response = error_response(413, "payload_too_large", message, {"limit_bytes": limit})
            response.headers["Connection"] = "close"
            return await response(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)
