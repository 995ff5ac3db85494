"""Liveness (/healthz), readiness (/readyz: database, broker, storage) and Prometheus /metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import Services, ServicesDep
from api.errors import error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(services: Services) -> None:
    with services.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _check_broker(services: Services) -> None:
    with services.celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)


def _check_storage(services: Services) -> None:
    services.blobs.exists("healthcheck/probe")


@router.get(
    "/readyz",
    summary="Readiness: database, broker and storage reachable",
    responses={200: {"description": "every check passed"}, **error_responses(503)},
)
async def readyz(
    services: ServicesDep,
) -> JSONResponse:
    checks: dict[str, dict[str, Any]] = {}
    for name, check in (
        ("database", _check_database),
        ("broker", _check_broker),
        ("storage", _check_storage),
    ):
        began = time.perf_counter()
        try:
            await run_in_threadpool(check, services)
            checks[name] = {"ok": True}
        except Exception as error:
            checks[name] = {
                "ok": False,
                "error": str(error).splitlines()[0][:300] if str(error) else repr(error),
            }
        checks[name]["seconds"] = round(time.perf_counter() - began, 4)
    ready = all(check["ok"] for check in checks.values())
    if ready:
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(name for name, check in checks.items() if not check["ok"])
    body = {"error": {"code": "not_ready", "message": f"not ready: {failing} unavailable", "details": checks}}
    return JSONResponse(body, status_code=503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
def metrics(
    services: ServicesDep,
) -> Response:
    registry = services.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
