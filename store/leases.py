"""Worker leases on jobs (store.jobs holds the state machine they drive).

A worker ``claim``s a queued job (atomically: one UPDATE ... WHERE unleased, so of two workers exactly
one wins) and moves it to ``preparing``; it renews the lease with ``heartbeat`` every few seconds.
``reap_expired`` re-queues jobs whose lease ran out, or fails them with ``worker_lost`` once they have
been started ``max_attempts`` times. Functions flush but never commit: the caller owns the transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.jobs import (
    ACTIVE_STATES,
    RUNNING_STATES,
    WORKER_LOST,
    LeaseLost,
    append_event,
    at_or_now,
    check_lease,
    lock_job,
    require_job,
    transition,
)
from store.tables import Job, JobEvent


def claim(
    session: Session, job_id: str, worker_id: str, lease_seconds: float, *, now: datetime | None = None
) -> bool:
    """Take the lease of a queued, unleased job and move it to ``preparing``; True if this worker got it
    (then attempts += 1).

    One atomic UPDATE ... WHERE: under concurrency the database lets exactly one claimant match the
    row. (A queued job holds no lease: claiming moves it out of queued in the same transaction, and
    every way back to queued clears the lease.)
    """
    now = at_or_now(now)
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.state == "queued",
            Job.cancel_requested.is_(False),
            Job.lease_owner.is_(None),
        )
        .values(
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    claimed = session.execute(stmt).rowcount == 1
    if claimed:
        job = lock_job(session, job_id)  # refresh any instance the caller holds
        assert job is not None
        transition(session, job, "preparing", worker_id=worker_id, now=now, message=f"claimed by {worker_id}")
    return claimed


def record_resumed(
    session: Session, job_id: str, worker_id: str, resumed_from: dict[str, Any], now: datetime | None = None
) -> JobEvent:
    """The event that says a re-queued job continues, and from where (stage, iteration)."""
    job = require_job(session, job_id)
    check_lease(job, worker_id)
    where = ", ".join(f"{k} {v}" for k, v in resumed_from.items())
    message = f"resumed: attempt {job.attempts} continues at {where}"
    return append_event(session, job, now=now, metrics={"resumed_from": resumed_from}, message=message)


def claim_next(
    session: Session, worker_id: str, lease_seconds: float, *, now: datetime | None = None
) -> Job | None:
    """Claim the oldest queued, unleased job, or None. Skips rows other workers have locked (Postgres)."""
    now = at_or_now(now)
    # Lock exactly one candidate: locking more would hide them from other workers until we commit.
    candidate = (
        select(Job.id)
        .where(Job.state == "queued", Job.cancel_requested.is_(False), Job.lease_owner.is_(None))
        .order_by(Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    job_id = session.execute(candidate).scalar_one_or_none()
    if job_id is None or not claim(session, job_id, worker_id, lease_seconds, now=now):
        return None
    return session.get(Job, job_id)


def heartbeat(
    session: Session, job_id: str, worker_id: str, lease_seconds: float, *, now: datetime | None = None
) -> bool:
    """Renew the lease; returns whether cancellation was requested. LeaseLost if it is not ours."""
    now = at_or_now(now)
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.state.in_(ACTIVE_STATES))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if session.execute(stmt).rowcount != 1:
        raise LeaseLost(f"job {job_id}: worker {worker_id} lost its lease")
    return bool(session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar_one())


def release(session: Session, job_id: str, worker_id: str, *, now: datetime | None = None) -> None:
    """Give a claimed job back to the queue without a failure (e.g. a worker shutting down)."""
    job = require_job(session, job_id)
    check_lease(job, worker_id)
    if job.state in RUNNING_STATES:
        transition(session, job, "queued", worker_id=worker_id, now=now, message="released by worker")
    else:
        job.lease_owner = None
        job.lease_expires_at = None
        job.updated_at = at_or_now(now)
    job.attempts = max(job.attempts - 1, 0)  # an orderly hand-back does not use up an attempt
    session.flush()


def expired_leases(session: Session, now: datetime | None = None) -> list[Job]:
    """Unfinished jobs whose worker stopped renewing its lease."""
    stmt = (
        select(Job)
        .where(
            Job.state.in_(ACTIVE_STATES), Job.lease_owner.is_not(None), Job.lease_expires_at < at_or_now(now)
        )
        .order_by(Job.lease_expires_at)
    )
    return list(session.execute(stmt).scalars().all())


def requeue(session: Session, job: Job | str, max_attempts: int, *, now: datetime | None = None) -> Job:
    """Handle a lost worker: back to queued, or failed 'worker_lost' after ``max_attempts`` starts.

    A job whose cancellation was requested is canceled instead.
    """
    job = require_job(session, job if isinstance(job, str) else job.id)
    if job.cancel_requested:
        return transition(session, job, "canceled", now=now, message="canceled (worker lost)")
    if job.attempts >= max_attempts:
        return transition(
            session,
            job,
            "failed",
            now=now,
            error_code=WORKER_LOST,
            error_message=f"the worker stopped responding {job.attempts} times (max_attempts {max_attempts})",
            message="worker lost; no attempts left",
        )
    return transition(session, job, "queued", now=now, message="worker lost; re-queued")


def reap_expired(session: Session, max_attempts: int, *, now: datetime | None = None) -> list[Job]:
    """Requeue (or fail) every job with an expired lease; returns the jobs it changed.

    Each row is re-checked under its lock with SKIP LOCKED, so two reapers, or a reaper racing a late
    heartbeat, never act on the same job twice.
    """
    now = at_or_now(now)
    changed = []
    for stale in expired_leases(session, now):
        job = lock_job(session, stale.id, skip_locked=True)
        if job is None or job.state not in ACTIVE_STATES or job.lease_owner is None:
            continue
        if job.lease_expires_at is None or job.lease_expires_at >= now:
            continue  # renewed meanwhile
        changed.append(requeue(session, job, max_attempts, now=now))
    return changed
