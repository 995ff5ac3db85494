"""The reaper: recovery from lost workers, driven by the jobs table rather than by the broker.

Each pass (``reap_once``):

1. ``store.jobs.reap_expired`` re-queues every job whose lease expired (its worker died or hung), or
   fails it with ``worker_lost`` once it was started ``max_attempts`` times; a re-queued job's task is
   sent again, and the worker that takes it resumes from the job's stored work dir mirror;
2. purges the work dir mirror (stage checkpoints) of jobs that ended more than
   ``checkpoint_retention_seconds`` ago; a ``checkpoints purged`` event marks the job as done, so each
   pass only looks at jobs not purged yet.

It runs as a daemon thread inside every worker process (started by worker/tasks.py when the Celery
worker is ready; ``srcompress worker`` therefore always has one). Several reapers are safe: rows are
re-checked under ``SELECT ... FOR UPDATE SKIP LOCKED`` on Postgres and serialized by SQLite's write lock,
so a job is re-queued once, and a duplicate task would be skipped by ``claim`` anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from store import jobs, leases
from store.blobs import BlobStore
from store.keys import work_prefix
from store.settings import Settings
from store.tables import Job, JobEvent, utcnow

log = logging.getLogger("srcompress.reaper")

PURGED_MESSAGE = "checkpoints purged"
PURGE_BATCH = 50


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # worker_lost, or canceled while its worker was gone
    purged: list[str] = field(default_factory=list)


def jobs_to_purge(
    session: Session, retention_seconds: int, now: datetime, limit: int = PURGE_BATCH
) -> list[str]:
    """Ids of finished jobs older than the retention whose mirror has not been purged yet."""
    purged = exists().where(JobEvent.job_id == Job.id, JobEvent.message == PURGED_MESSAGE)
    stmt = (
        select(Job.id)
        .where(
            Job.state.in_(jobs.TERMINAL_STATES),
            Job.finished_at <= now - timedelta(seconds=retention_seconds),
            ~purged,
        )
        .order_by(Job.finished_at)
        .limit(limit)
    )
    return list(session.execute(stmt).scalars().all())


def reap_once(
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: BlobStore,
    enqueue: Callable[[str], None],
    *,
    now: datetime | None = None,
) -> ReapResult:
    """One reaper pass; ``enqueue(job_id)`` re-sends a re-queued job's task (after the commit)."""
    now = now or utcnow()
    result = ReapResult()
    with sessions.begin() as session:
        for job in leases.reap_expired(session, settings.max_attempts, now=now):
            (result.requeued if job.state == "queued" else result.failed).append(job.id)
    for job_id in result.requeued:
        log.warning("job %s: worker lost; re-queued", job_id)
        enqueue(job_id)
    for job_id in result.failed:
        log.warning("job %s: worker lost; ended", job_id)

    with sessions() as session:
        candidates = jobs_to_purge(session, settings.checkpoint_retention_seconds, now)
    for job_id in candidates:
        removed = blobs.delete_prefix(work_prefix(job_id))
        with sessions.begin() as session:
            job = jobs.lock_job(session, job_id, skip_locked=True)
            if job is None:
                continue  # another reaper is on it
            jobs.append_event(session, job, now=now, fraction=job.progress, message=PURGED_MESSAGE)
        log.info("job %s: purged %d stored work files", job_id, removed)
        result.purged.append(job_id)
    return result


class Reaper(threading.Thread):
    """Calls ``reap_once`` every ``interval`` seconds until ``stop()``; errors are logged, not fatal."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        blobs: BlobStore,
        enqueue: Callable[[str], None],
        interval: float | None = None,
    ) -> None:
        super().__init__(name="srcompress-reaper", daemon=True)
        self.sessions = sessions
        self.settings = settings
        self.blobs = blobs
        self.enqueue = enqueue
        # Half a heartbeat: an expired lease is noticed well within one lease period.
        self.interval = interval if interval is not None else max(settings.heartbeat_seconds / 2, 0.5)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reap_once(self.sessions, self.settings, self.blobs, self.enqueue)
            except Exception:
                log.exception("reaper pass failed; retrying")

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=30)
