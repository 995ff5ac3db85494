"""Celery tasks of the compression workers, and the reaper thread every worker process runs.

``run_job(job_id)`` runs (or resumes) one job with ``worker.runner.JobRunner``; it never raises for a
job's own failure (that is recorded in the jobs table) and returns how the run ended. When the Celery
worker is ready, a ``worker.reaper.Reaper`` thread starts in its main process and stops at shutdown.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from store.queue import TASK_NAME
from store.settings import Settings
from worker.app import app, enqueue_job

log = logging.getLogger("srcompress.worker")
_reaper: Any = None  # the reaper thread of this worker process (set by the worker_ready signal)


@app.task(name=TASK_NAME)
def run_job(job_id: str) -> str:
    """Run job ``job_id``; returns succeeded | failed | canceled | lost | skipped."""
    from worker.runner import JobRunner

    runner = JobRunner(Settings())
    try:
        outcome = runner.run(job_id)
    finally:
        runner.engine.dispose()
    log.info(
        "job %s: %s%s", job_id, outcome.state, f" ({outcome.error_message})" if outcome.error_message else ""
    )
    return outcome.state


@worker_ready.connect
def start_reaper(**_kwargs: Any) -> None:
    global _reaper
    from store.blobs import make_blob_store
    from store.db import make_engine, session_factory
    from worker.reaper import Reaper

    settings = Settings()
    sessions = session_factory(make_engine(settings.database_url))
    _reaper = Reaper(sessions, settings, make_blob_store(settings), lambda job_id: enqueue_job(job_id, app))
    _reaper.start()
    log.info("reaper started in worker process %d (every %.1f s)", os.getpid(), _reaper.interval)


@worker_shutdown.connect
def stop_reaper(**_kwargs: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
