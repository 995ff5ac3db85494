"""The job queue's contract between the API and the workers: the Celery task's name, its queue, and the
worker's command line. Plain strings: the API sends tasks by name and never imports worker code (nor
torch's training stack with it). A message carries only a job id; the jobs table is the truth."""

from __future__ import annotations

import sys

TASK_NAME = "srcompress.run_job"
TASK_QUEUE = "srcompress.jobs"
WORKER_APP = "worker.app"  # the Celery application module


def worker_args(
    pool: str = "prefork", concurrency: int = 1, loglevel: str = "INFO", hostname: str | None = None
) -> list[str]:
    """`celery worker` arguments of a compression worker: one job at a time per process (run one worker
    per GPU; the embedded default may run a few), listening to the jobs queue only."""
    args = [
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={TASK_QUEUE}",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={loglevel}",
    ]
    return args + ([f"--hostname={hostname}"] if hostname else [])


def worker_command(pool: str = "solo", concurrency: int = 1, hostname: str | None = None) -> list[str]:
    """The same worker as a process of its own (what `srcompress serve` and the tests start)."""

    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        WORKER_APP,
        *worker_args(pool, concurrency, hostname=hostname),
    ]
