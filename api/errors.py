"""One JSON error shape for every failure: ``{"error": {"code", "message", "details"}}``.

Handlers cover our own ``ApiError``, FastAPI's request validation (422), Starlette's HTTP errors (404 for
unknown routes, 405, ...) and core/store ``UserError``s, which are mapped to a status by type. Anything
else is a 500 with a generic message (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import CheckpointError, ImageError, ImageTooLarge, UserError, describe_validation_error
from store.jobs import IdempotencyConflict, IllegalTransition, JobNotFound

log = logging.getLogger("srcompress.api")

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable, e.g. not_found, invalid_request")
    message: str = Field(description="one line for a person")
    details: Any = None


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the error answers a router's operations give, all in the one shape."""
    return {
        status: {"model": ErrorBody, "description": HTTP_CODES[status].replace("_", " ")}
        for status in statuses
    }


class ApiError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a one-line message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def not_found(kind: str, object_id: str) -> ApiError:
    # The same answer for "missing" and "someone else's": ids of other keys must not be probeable.
    return ApiError(404, "not_found", f"{kind} {object_id} not found")


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": jsonable_encoder(details)}}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def user_error_status(error: UserError) -> tuple[int, str]:
    """The HTTP status and code of a core/store UserError."""
    if isinstance(error, JobNotFound):
        return 404, "not_found"
    if isinstance(error, IllegalTransition):
        return 409, "illegal_transition"
    if isinstance(error, IdempotencyConflict):
        return 422, "idempotency_conflict"
    if isinstance(error, CheckpointError):
        return 422, "invalid_checkpoint"
    if isinstance(error, ImageTooLarge):
        return 413, "image_too_large"
    if isinstance(error, ImageError):
        return 422, "invalid_image"
    return 422, "invalid_request"


def _validation_details(error: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for item in error.errors():
        details.append(
            {"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type", "")}
        )
    return details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.details, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        details = _validation_details(error)
        message = describe_validation_error(details, skip={"body"}, limit=3, whole="body")
        return error_response(422, "invalid_request", f"invalid request: {message}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(error.status_code, "error")
        message = error.detail if isinstance(error.detail, str) else code.replace("_", " ")
        return error_response(error.status_code, code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(UserError)
    async def _user_error(_request: Request, error: UserError) -> JSONResponse:
        status, code = user_error_status(error)
        return error_response(status, code, str(error).strip().splitlines()[0] if str(error) else code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error")
