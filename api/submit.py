"""Submitting a job: its references checked against the caller's rows, the per-key limit on unfinished
jobs, idempotent creation (Idempotency-Key), and the task sent to the workers (503 when the broker is
down; the job is then recorded as failed, never left queued without a message)."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.crud import owned_model, visible_dataset
from api.deps import Caller, Services
from api.errors import ApiError
from api.schemas import JobCreate, JobOut
from api.webhooks import check_webhook
from core.models.presets import PRESETS
from store import jobs as store_jobs
from store.queue import TASK_NAME, TASK_QUEUE
from store.tables import Job

log = logging.getLogger("srcompress.api")


def request_hash(body: JobCreate) -> str:
    """sha256 of the request's canonical form: the same fields and values hash the same however sent."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_config(body: JobCreate) -> dict[str, Any]:
    """What the worker needs besides the teacher model id: JobParams plus the datasets by role."""
    config = body.params().model_dump(mode="json")
    config["train_dataset_ids"] = list(dict.fromkeys(body.train_dataset_ids))
    config["val_dataset_ids"] = list(dict.fromkeys(body.val_dataset_ids))
    return config


def _check_references(session: Session, caller: Caller, body: JobCreate) -> None:
    teacher = owned_model(session, caller, body.teacher_model_id)
    expected_family = PRESETS[body.model]["family"] if body.model in PRESETS else None
    if expected_family is None:
        raise ApiError(
            422, "invalid_request", f"unknown preset {body.model!r}; choose one of: {', '.join(PRESETS)}"
        )
    if teacher.family != expected_family:
        raise ApiError(
            422,
            "teacher_mismatch",
            f"teacher model {teacher.id} is a {teacher.family} model, not {body.model} ({expected_family})",
        )
    if teacher.scale != body.scale:
        raise ApiError(
            422, "teacher_mismatch", f"teacher model {teacher.id} is x{teacher.scale}, not x{body.scale}"
        )
    for dataset_id in [*body.train_dataset_ids, *body.val_dataset_ids]:
        visible_dataset(session, caller, dataset_id)


def _existing_for_key(session: Session, caller: Caller, idempotency_key: str) -> Job | None:
    stmt = select(Job).where(Job.owner_key_id == caller.key_id, Job.idempotency_key == idempotency_key)
    return session.execute(stmt).scalar_one_or_none()


def enqueue(services: Services, job_id: str) -> None:
    services.celery.send_task(TASK_NAME, args=[job_id], queue=TASK_QUEUE)


def submit_job(
    services: Services, caller: Caller, body: JobCreate, idempotency_key: str | None
) -> tuple[JobOut, bool]:
    """The queued job (or, for a replayed Idempotency-Key, the earlier one) and whether it is new."""
    settings = services.settings
    digest = request_hash(body)
    check_webhook(services, caller, body)  # before the write transaction: it may resolve a host name
    with services.sessions.begin() as session:
        _check_references(session, caller, body)
        replaying = (
            idempotency_key is not None and _existing_for_key(session, caller, idempotency_key) is not None
        )
        if (
            not replaying
            and store_jobs.count_active_jobs(session, caller.key_id) >= settings.max_running_jobs_per_key
        ):
            raise ApiError(
                429,
                "too_many_jobs",
                f"this key already has {settings.max_running_jobs_per_key} unfinished jobs; "
                "wait for one to finish or cancel one",
                {"limit": settings.max_running_jobs_per_key},
                headers={"Retry-After": "30"},
            )
        config = job_config(body)
        job, created = store_jobs.create_job(
            session,
            config=config,
            owner_key_id=caller.key_id,
            teacher_model_id=body.teacher_model_id,
            dataset_ids=list(dict.fromkeys([*config["train_dataset_ids"], *config["val_dataset_ids"]])),
            idempotency_key=idempotency_key,
            request_hash=digest,
            idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
            webhook_url=body.webhook_url,
            webhook_events=body.webhook_events,
        )
        out = JobOut.of(job)
    if created:
        try:
            enqueue(services, job.id)
        except Exception as error:
            log.exception("could not enqueue job %s", job.id)
            with services.sessions.begin() as session:
                store_jobs.transition(
                    session, job.id, "failed", error_code="broker_unavailable", error_message=str(error)[:500]
                )
            raise ApiError(
                503,
                "broker_unavailable",
                "the job queue is unavailable; try again later",
                headers={"Retry-After": "10"},
            ) from None
    return out, created
