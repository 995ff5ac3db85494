"""The Celery application of the compression workers.

Configured from ``store.settings.Settings`` (environment prefix ``SRCOMPRESS_``): Redis in production, or
kombu's SQLAlchemy transport on SQLite for the embedded default (no server needed). Job state never
lives in Celery: the jobs table is the source of truth, and a task only carries a job id. So:

- one job at a time per worker process (``worker_prefetch_multiplier=1``, concurrency 1): a GPU job
  holds the whole device, and a prefetched message would sit behind a job that runs for hours;
- ``task_acks_late``: a message is acknowledged when its task returns. A redelivered duplicate is
  harmless, since ``store.leases.claim`` lets only one worker take a job, but recovery from a lost worker
  does not wait for redelivery: the reaper (worker/reaper.py) re-queues a job whose lease expired;
- results are ignored (callers read the jobs table).

``enqueue_job(job_id)`` is what the API calls after it committed a new job.
"""

from __future__ import annotations

from celery import Celery

from store.queue import TASK_NAME, TASK_QUEUE
from store.settings import Settings


def create_celery_app(settings: Settings | None = None) -> Celery:
    """A Celery app bound to ``settings`` (read from the environment when None)."""
    settings = settings or Settings()
    # worker.webhooks: its sender thread starts with the worker, beside the reaper.
    app = Celery("srcompress", broker=settings.broker_url, include=["worker.tasks", "worker.webhooks"])
    app.conf.update(
        task_default_queue=TASK_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=False,  # the reaper, not the broker, recovers jobs of dead workers
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # A fresh child process per job on the prefork pool: no CUDA context or leaked memory carried over.
        worker_max_tasks_per_child=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
    )
    return app


app = create_celery_app()


def enqueue_job(job_id: str, celery_app: Celery | None = None) -> None:
    """Ask a worker to run (or resume) job ``job_id``. Sent by name: the caller needs no torch import."""
    (celery_app or app).send_task(TASK_NAME, args=[job_id], queue=TASK_QUEUE)
