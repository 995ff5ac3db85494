"""Jobs: submit (idempotent, rate-limited per key), list, show, cancel, progress events (SSE with replay
from Last-Event-ID), the report and the artifacts. The work itself happens in a Celery worker: the API
only inserts the job row and sends ``worker.tasks.run_job`` by name."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import select

from api.crud import owned_job, stream_blob
from api.deps import (
    MAX_OFFSET,
    CurrentCaller,
    Offset,
    ReadSession,
    Services,
    ServicesDep,
)
from api.errors import ApiError, error_responses, not_found
from api.schemas import ArtifactOut, EventOut, JobCreate, JobOut, Page
from api.submit import submit_job
from store import jobs as store_jobs
from store.jobs import JOB_STATES
from store.tables import Artifact, Job

router = APIRouter(prefix="/v1", tags=["jobs"], responses=error_responses(401, 404, 409, 413, 422, 429, 503))
log = logging.getLogger("srcompress.api")

SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0


@router.post("/jobs", status_code=202, response_model=JobOut, summary="Submit a compression job")
def create_job(
    body: JobCreate,
    services: ServicesDep,
    caller: CurrentCaller,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=255),
) -> Any:
    """202 with the queued job. The same Idempotency-Key with the same body (within
    idempotency_ttl_seconds) returns the same job; with a different body, 422."""
    out, created = submit_job(services, caller, body, idempotency_key)
    # A replay answers exactly like the first request did, and says so.
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(out.model_dump(mode="json"), status_code=202, headers=headers)


@router.get("/jobs", response_model=Page[JobOut], summary="The caller's jobs, newest first")
def list_jobs(
    session: ReadSession,
    caller: CurrentCaller,
    state: str | None = Query(None, description="filter: " + ", ".join(JOB_STATES)),
    limit: int = Query(20, ge=1, le=100),
    offset: Offset = 0,
) -> Any:
    where = [Job.owner_key_id == caller.key_id]
    if state is not None:
        states = [s.strip() for s in state.split(",") if s.strip()]
        unknown = [s for s in states if s not in JOB_STATES]
        if unknown:
            raise ApiError(
                422, "invalid_request", f"unknown state {unknown[0]!r}; choose from {', '.join(JOB_STATES)}"
            )
        where.append(Job.state.in_(states))
    return Page[JobOut].of_rows(session, Job, where, JobOut.of, limit, offset)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="One job: state, stage, progress, metrics")
def show_job(
    job_id: str,
    session: ReadSession,
    caller: CurrentCaller,
) -> Any:
    return JobOut.of(owned_job(session, caller, job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, summary="Cancel a job")
def cancel_job(
    job_id: str,
    services: ServicesDep,
    caller: CurrentCaller,
) -> Any:
    """A queued job is canceled at once; a running one is flagged and its worker stops within seconds."""
    with services.sessions.begin() as session:
        owned_job(session, caller, job_id)
        job = store_jobs.request_cancel(session, job_id)
        return JobOut.of(job)


# --- events -------------------------------------------------------------------------------------------


def _sse(event: EventOut) -> str:
    kind = (
        "state"
        if event.fraction in (None, 0.0) or event.state in ("queued", *store_jobs.TERMINAL_STATES)
        else "progress"
    )
    return f"id: {event.id}\nevent: {kind}\ndata: {event.model_dump_json()}\n\n"


def _poll(services: Services, job_id: str, after: int) -> tuple[list[EventOut], str]:
    with services.read_sessions() as session:
        events = [EventOut.of(row) for row in store_jobs.events_after(session, job_id, after, limit=500)]
        state = session.execute(select(Job.state).where(Job.id == job_id)).scalar_one()
    return events, state


@router.get(
    "/jobs/{job_id}/events",
    summary="Progress as server-sent events (replay with Last-Event-ID)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    request: Request,
    services: ServicesDep,
    caller: CurrentCaller,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    after: int | None = Query(None, ge=0, le=MAX_OFFSET, description="same as Last-Event-ID"),
    follow: bool = Query(True, description="keep the stream open until the job finishes"),
) -> StreamingResponse:
    def check() -> None:
        with services.read_sessions() as session:
            owned_job(session, caller, job_id)

    await run_in_threadpool(check)
    start = after or 0
    if last_event_id:
        try:
            start = int(last_event_id)
        except ValueError:
            start = -1
        if not 0 <= start <= MAX_OFFSET:
            raise ApiError(
                422, "invalid_request", f"Last-Event-ID must be an event id, got {last_event_id[:40]!r}"
            )

    async def stream() -> AsyncIterator[str]:
        cursor = start
        idle = 0.0
        yield "retry: 2000\n\n"
        while True:
            # A short read session per poll: never hold a transaction across the wait (SQLite).
            events, state = await run_in_threadpool(_poll, services, job_id, cursor)
            for event in events:
                cursor = event.id
                yield _sse(event)
            if events:
                idle = 0.0
                continue  # drain a backlog before waiting
            if state in store_jobs.TERMINAL_STATES or not follow:
                yield "event: end\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_SECONDS)
            idle += SSE_POLL_SECONDS
            if idle >= SSE_KEEPALIVE_SECONDS:
                idle = 0.0
                yield ": keep-alive\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


# --- report and artifacts -----------------------------------------------------------------------------


@router.get("/jobs/{job_id}/report", summary="core's CompressionReport of a succeeded job")
def job_report(
    job_id: str,
    session: ReadSession,
    caller: CurrentCaller,
) -> Any:
    job = owned_job(session, caller, job_id)
    if job.report is None:
        raise ApiError(
            409, "not_ready", f"job {job_id} is {job.state}; the report exists once it has succeeded"
        )
    return job.report


def _artifact_url(job_id: str, name: str) -> str:
    return f"/v1/jobs/{job_id}/artifacts/{name}"


@router.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactOut], summary="Files the job produced")
def list_artifacts(
    job_id: str,
    session: ReadSession,
    caller: CurrentCaller,
) -> Any:
    owned_job(session, caller, job_id)
    rows = session.execute(
        select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
    ).scalars()
    return [
        ArtifactOut(
            name=row.name, content_type=row.content_type, size=row.size, url=_artifact_url(job_id, row.name)
        )
        for row in rows
    ]


@router.get("/jobs/{job_id}/artifacts/{name:path}", summary="Download one artifact (plots, model card, ...)")
def get_artifact(
    job_id: str,
    name: str,
    session: ReadSession,
    services: ServicesDep,
    caller: CurrentCaller,
) -> Response:
    owned_job(session, caller, job_id)
    row = session.execute(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    ).scalar_one_or_none()
    if row is None:
        raise not_found("artifact", f"{job_id}/{name}")
    response = stream_blob(services.blobs, row.blob_key, name.rsplit("/", 1)[-1], row.content_type)
    response.headers["Content-Disposition"] = f'inline; filename="{name.rsplit("/", 1)[-1]}"'
    return response
