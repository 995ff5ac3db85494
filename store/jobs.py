"""The job state machine and the job event log.

States: ``queued`` -> ``preparing`` (a worker claimed it and fetches its inputs) -> running stages
(``pruning``, ``compressing``, ``distilling``, ``evaluating``, ``exporting``) -> ``succeeded`` |
``failed`` | ``canceled``.

- Running stages only move forward, but may skip (a config can leave a stage out; a resumed job
  re-enters at the stage of its last checkpoint, so ``queued`` may go to any running stage).
- ``succeeded`` needs a running stage before it; ``failed`` and ``canceled`` are reachable from every
  unfinished state; finished states are final. A running job goes back to ``queued`` only when its lease
  is lost (``requeue``).

Leases (``claim``, ``heartbeat``, ``reap_expired``) live in store.leases; ``transition`` and
``report_progress`` take the worker's id so that a worker that lost its lease cannot write.

Every state change and progress report appends a ``JobEvent`` (seq 1, 2, ... per job) carrying the
attempt it belongs to; a worker that continues a re-queued job says where it resumed (``resumed``).
Rows are locked (``SELECT ... FOR UPDATE``) before they are changed on Postgres; on SQLite the whole
transaction holds the database's write lock (store.db), which serializes writers just as well.

Functions flush but never commit: the caller owns the transaction. ``now`` defaults to the current UTC
time and exists so that tests can move the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import UserError
from core.job import STAGES
from store import webhooks
from store.tables import Job, JobEvent, utcnow

# A job's states: queued, preparing (inputs downloading), then one state per stage of the job
# contract's STAGES (core.job, the one definition), then how it ended.
RUNNING_STATES = ("preparing", *STAGES)
TERMINAL_STATES = ("succeeded", "failed", "canceled")
ACTIVE_STATES = ("queued", *RUNNING_STATES)  # not finished
JOB_STATES = (*ACTIVE_STATES, *TERMINAL_STATES)
WORKER_LOST = "worker_lost"


class IllegalTransition(UserError):
    """A state change the state machine forbids (the API answers 409)."""


class LeaseLost(RuntimeError):
    """The worker no longer holds the job's lease: it must stop without writing anything else."""


class JobNotFound(UserError):
    """No job with that id."""


class IdempotencyConflict(UserError):
    """The Idempotency-Key was already used with a different request body (the API answers 422/409)."""


def allowed_transitions(state: str) -> tuple[str, ...]:
    """The states that ``state`` may move to."""
    if state in TERMINAL_STATES:
        return ()
    if state == "queued":
        return (*RUNNING_STATES, "failed", "canceled")
    if state in RUNNING_STATES:
        later = RUNNING_STATES[RUNNING_STATES.index(state) + 1 :]
        return (*later, "queued", "succeeded", "failed", "canceled")
    raise ValueError(f"unknown job state {state!r}")


def is_allowed(old: str, new: str) -> bool:
    return new in allowed_transitions(old)


def at_or_now(now: datetime | None) -> datetime:
    return utcnow() if now is None else now


def lock_job(session: Session, job_id: str, *, skip_locked: bool = False) -> Job | None:
    """Load the job's current row and lock it for the rest of the transaction (Postgres FOR UPDATE).

    ``populate_existing`` refreshes an instance already in the session, so decisions are made on the
    row as it is now, not as it was when the caller loaded it.
    """
    stmt = (
        select(Job)
        .where(Job.id == job_id)
        .with_for_update(skip_locked=skip_locked)
        .execution_options(populate_existing=True)
    )
    return session.execute(stmt).scalar_one_or_none()


def require_job(session: Session, job_id: str) -> Job:
    job = lock_job(session, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return job


def check_lease(job: Job, worker_id: str | None) -> None:
    if worker_id is not None and job.lease_owner != worker_id:
        raise LeaseLost(f"job {job.id}: worker {worker_id} does not hold the lease (owner {job.lease_owner})")


def append_event(
    session: Session,
    job: Job,
    *,
    now: datetime | None = None,
    fraction: float | None = None,
    metrics: dict[str, Any] | None = None,
    message: str | None = None,
) -> JobEvent:
    """Record the job's current state/stage as an event. The job row must be locked (lock_job)."""
    last_seq = session.execute(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job.id)).scalar()
    event = JobEvent(
        job_id=job.id,
        seq=(last_seq or 0) + 1,
        state=job.state,
        stage=job.stage,
        attempt=max(job.attempts, 1),
        fraction=fraction,
        metrics=metrics,
        message=message,
        created_at=at_or_now(now),
    )
    session.add(event)
    session.flush()
    return event


def create_job(
    session: Session,
    *,
    config: dict[str, Any],
    owner_key_id: str | None = None,
    teacher_model_id: str | None = None,
    dataset_ids: Sequence[str] = (),
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    idempotency_ttl_seconds: int = 86400,
    webhook_url: str | None = None,
    webhook_events: Sequence[str] | None = None,
    now: datetime | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job (plus its first event); returns (job, created).

    With an ``idempotency_key`` already used by the same key within the TTL, the earlier job is returned
    with created=False, or IdempotencyConflict is raised if ``request_hash`` differs. An expired key is
    released (cleared on the old job) and a new job is created.
    """
    now = at_or_now(now)
    if idempotency_key is not None:
        previous = _job_with_idempotency_key(session, owner_key_id, idempotency_key)
        if previous is not None:
            if previous.created_at > now - timedelta(seconds=idempotency_ttl_seconds):
                return _replay(previous, idempotency_key, request_hash), False
            previous.idempotency_key = None  # expired: release the key
            session.flush()
    job = Job(
        owner_key_id=owner_key_id,
        state="queued",
        config=config,
        teacher_model_id=teacher_model_id,
        dataset_ids=list(dataset_ids),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        webhook_url=webhook_url,
        webhook_events=list(webhook_events) if webhook_events else None,
        created_at=now,
        updated_at=now,
    )
    try:
        # A concurrent request with the same key may insert first: the unique constraint stops us
        # (on Postgres after waiting for that transaction), and we replay its job instead.
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        previous = _job_with_idempotency_key(session, owner_key_id, idempotency_key)
        if previous is None:
            raise
        return _replay(previous, idempotency_key, request_hash), False
    append_event(session, job, now=now, fraction=0.0, message="created")
    return job, True


def _job_with_idempotency_key(session: Session, owner_key_id: str | None, idempotency_key: str) -> Job | None:
    stmt = select(Job).where(Job.owner_key_id == owner_key_id, Job.idempotency_key == idempotency_key)
    return session.execute(stmt.with_for_update()).scalar_one_or_none()


def _replay(previous: Job, idempotency_key: str, request_hash: str | None) -> Job:
    if previous.request_hash != request_hash:
        raise IdempotencyConflict(
            f"Idempotency-Key {idempotency_key!r} was already used with a different request"
        )
    return previous


def transition(
    session: Session,
    job: Job | str,
    new_state: str,
    *,
    worker_id: str | None = None,
    now: datetime | None = None,
    message: str | None = None,
    metrics: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    result_model_id: str | None = None,
) -> Job:
    """Move a job to ``new_state`` and append the event; IllegalTransition if the move is not allowed.

    The decision is made on the locked current row, so a job canceled meanwhile by the API cannot be
    moved on by a worker. With ``worker_id`` the caller must hold the lease (else LeaseLost). ``metrics``
    is stored on the job (when given) and on the event; ``report``, ``error_*`` and ``result_model_id``
    are stored on the job when given. A webhook delivery is stored with the event when the job has a
    ``webhook_url`` that wants it (store.webhooks: the outbox, sent by the worker after the commit).
    """
    now = at_or_now(now)
    job = require_job(session, job if isinstance(job, str) else job.id)
    check_lease(job, worker_id)
    if not is_allowed(job.state, new_state):
        raise IllegalTransition(f"job {job.id}: cannot go from {job.state} to {new_state}")

    old_state = job.state
    job.state = new_state
    job.updated_at = now
    if new_state in RUNNING_STATES:
        job.stage = new_state
        job.progress = 0.0
        job.started_at = job.started_at or now
    elif new_state == "queued":
        job.lease_owner = None
        job.lease_expires_at = None
    else:  # finished: nobody holds it any longer
        job.finished_at = now
        job.lease_owner = None
        job.lease_expires_at = None
        if new_state == "succeeded":
            job.progress = 1.0
    if metrics is not None:
        job.metrics = metrics
    if report is not None:
        job.report = report
    if error_code is not None:
        job.error_code = error_code
    if error_message is not None:
        job.error_message = error_message
    if result_model_id is not None:
        job.result_model_id = result_model_id
    session.flush()
    event = append_event(session, job, now=now, fraction=job.progress, metrics=metrics, message=message)
    webhooks.record_event(session, job, old_state, event)
    return job


def report_progress(
    session: Session,
    job_id: str,
    fraction: float,
    *,
    worker_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    message: str | None = None,
    now: datetime | None = None,
) -> JobEvent:
    """Set the current stage's progress (0..1) and append a progress event without changing state."""
    now = at_or_now(now)
    job = require_job(session, job_id)
    check_lease(job, worker_id)
    if job.state not in RUNNING_STATES:
        raise IllegalTransition(f"job {job.id}: progress reported while {job.state}")
    job.progress = min(max(float(fraction), 0.0), 1.0)
    job.updated_at = now
    session.flush()
    return append_event(session, job, now=now, fraction=job.progress, metrics=metrics, message=message)


def request_cancel(session: Session, job_id: str, *, now: datetime | None = None) -> Job:
    """Cancel a job: at once if no worker holds it, else by flag (the worker sees it on heartbeat).

    Canceling a canceled job is a no-op; canceling a succeeded or failed one is IllegalTransition.
    """
    now = at_or_now(now)
    job = require_job(session, job_id)
    if job.state == "canceled":
        return job
    if job.state in TERMINAL_STATES:
        raise IllegalTransition(f"job {job.id} already {job.state}")
    leased = job.lease_owner is not None and job.lease_expires_at is not None and job.lease_expires_at > now
    if job.state == "queued" and not leased:
        return transition(session, job, "canceled", now=now, message="canceled before start")
    if not job.cancel_requested:
        job.cancel_requested = True
        job.updated_at = now
        session.flush()
        append_event(session, job, now=now, fraction=job.progress, message="cancel requested")
    return job


def count_active_jobs(session: Session, owner_key_id: str) -> int:
    """Unfinished jobs of an API key (for max_running_jobs_per_key)."""
    stmt = (
        select(func.count())
        .select_from(Job)
        .where(Job.owner_key_id == owner_key_id, Job.state.in_(ACTIVE_STATES))
    )
    return int(session.execute(stmt).scalar_one())


def events_after(session: Session, job_id: str, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
    """A job's events with id > ``after_id`` in id order (SSE replay from Last-Event-ID)."""
    stmt = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return list(session.execute(stmt).scalars().all())
