"""The lease heartbeat: a thread that renews a running job's lease and picks up its cancel flag."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from store import jobs, leases

log = logging.getLogger("srcompress.worker")


class Heartbeat(threading.Thread):
    """Renews the job's lease every ``interval`` seconds and mirrors the job's cancel flag.

    ``should_stop()`` is what the pipeline polls at every step: true once a cancel was requested or the
    lease was lost. Database errors are logged and retried at the next beat (the lease outlives a few).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        worker_id: str,
        lease_seconds: int,
        interval: float,
    ) -> None:
        super().__init__(name=f"heartbeat-{job_id[:8]}", daemon=True)
        self.sessions = sessions
        self.job_id = job_id
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._stop_beating = threading.Event()

    def beat(self) -> None:
        try:
            with self.sessions.begin() as session:
                if leases.heartbeat(session, self.job_id, self.worker_id, self.lease_seconds):
                    self.cancel_requested.set()
        except jobs.LeaseLost:
            log.warning("job %s: lease lost; stopping", self.job_id)
            self.lease_lost.set()
        except Exception:
            log.exception("job %s: heartbeat failed; retrying", self.job_id)

    def run(self) -> None:
        while not self._stop_beating.wait(self.interval) and not self.lease_lost.is_set():
            self.beat()

    def stop(self) -> None:
        self._stop_beating.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.interval + 30)

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lease_lost.is_set()
