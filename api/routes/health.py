"""Liveness (/healthz), readiness (/readyz: database, broker, storage) and Prometheus /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from sqlalchemy import func, select, text

from api.deps import Services, get_services
from api.errors import error_responses
from store.tables import JOB_STATES, Job

router = APIRouter(tags=["health"])


class Metrics:
    """The app's own Prometheus registry (no global default registry: two apps never collide)."""

    def __init__(self, services: Services) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "srcompress_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "srcompress_http_request_seconds",
            "HTTP request latency by route template.",
            ["route"],
            registry=self.registry,
        )
        self.registry.register(_ServiceCollector(services))


class _ServiceCollector:
    """Values read at scrape time: upscale queue depth, jobs by state, stage durations."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Any]:
        pool = self.services.extras.get("upscale_pool")
        queue = GaugeMetricFamily(
            "srcompress_upscale_queue_depth", "Upscale requests admitted and not finished."
        )
        queue.add_metric([], pool.admitted if pool is not None else 0)
        yield queue

        jobs = GaugeMetricFamily("srcompress_jobs", "Jobs by state.", labels=["state"])
        stages = SummaryMetricFamily(
            "srcompress_stage_duration_seconds",
            "Pipeline stage durations of succeeded jobs.",
            labels=["stage"],
        )
        try:
            with self.services.read_sessions() as session:
                counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                reports = session.execute(
                    select(Job.report)
                    .where(Job.state == "succeeded")
                    .order_by(Job.finished_at.desc())
                    .limit(500)
                ).scalars()
                totals: dict[str, list[float]] = {}
                for report in reports:
                    for stage, seconds in ((report or {}).get("stage_seconds") or {}).items():
                        totals.setdefault(stage, []).append(float(seconds))
        except Exception:  # a scrape must not fail because the database is down; /readyz reports that
            counts, totals = {}, {}
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        for stage, values in totals.items():
            stages.add_metric([stage], len(values), sum(values))
        yield stages


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
async def readyz(services: Services = Depends(get_services)) -> JSONResponse:
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
def metrics(services: Services = Depends(get_services)) -> Response:
    registry = services.extras["metrics"].registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
