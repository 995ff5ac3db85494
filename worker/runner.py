"""Run one compression job on this worker: plain Python, called by the Celery task (worker/tasks.py).

``JobRunner(settings).run(job_id)``:

1. claims the job's lease (``store.leases.claim``); a job that is not queued, or that another worker
   holds, is skipped, so a duplicate or late message is harmless;
2. starts a heartbeat thread that renews the lease every ``heartbeat_seconds`` and picks up the cancel
   flag; a lost lease stops the job without writing anything else (another worker owns it now);
3. downloads the teacher model and the datasets from blob storage (``sample`` is the bundled set) and
   restores the job's work dir from its mirror in storage, so a re-queued job resumes from its last
   uploaded checkpoint instead of starting over;
4. calls ``core.pipeline.run_pipeline``: stage changes become state transitions, progress becomes
   events (at most one per ``PROGRESS_MIN_SECONDS`` per stage), and after each progress report the
   files that changed in the work dir (checkpoints, state.json) are uploaded to the mirror, at most
   once per heartbeat interval and always on a stage change;
5. on success uploads ``out/`` as artifacts, registers the compact model as a Model row (source 'job',
   owner = the job's owner) with its weights, config and ONNX blobs, stores the report and moves the job
   to ``succeeded``, all in one transaction; ``Canceled`` ends it ``canceled``; a ``UserError`` (or an
   invalid config) ends it ``failed`` with code ``invalid_input``; anything else ``failed`` with code
   ``internal``. The local work dir is removed; the storage mirror is purged by the reaper
   ``checkpoint_retention_seconds`` after the job ended.

Blob layout: store.keys.
"""

from __future__ import annotations

import logging
import math
import mimetypes
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.errors import Canceled, Diverged, UserError, describe_validation_error
from core.models.config import CONFIG_FILE, WEIGHTS_FILE
from store import jobs, leases
from store.blobs import BlobStore, download_dir, make_blob_store
from store.db import make_engine, session_factory
from store.keys import artifact_key, work_prefix
from store.models import put_model_files, register_model
from store.settings import Settings
from store.tables import Artifact, Dataset, Job, Model, new_id
from worker.heartbeat import Heartbeat
from worker.mirror import WorkdirMirror

log = logging.getLogger("srcompress.worker")

SAMPLE_DATASET_ID = "sample"  # the bundled images; the API lists it as a dataset too
# Keys of a job's stored config that name inputs by id; everything else is core's JobParams.
ID_FIELDS = ("teacher_model_id", "train_dataset_ids", "val_dataset_ids")
PROGRESS_MIN_SECONDS = 1.0
ERROR_INVALID_INPUT = "invalid_input"
ERROR_INTERNAL = "internal"
ERROR_DIVERGED = "diverged"  # a training loss stopped being finite
MAX_ERROR_MESSAGE = 2000

PipelineFn = Callable[..., Any]  # core.pipeline.run_pipeline's signature


def default_worker_id() -> str:
    """host:pid:random, unique per runner, readable in the jobs table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: numpy scalars to Python, tuples to lists, NaN/inf to None (Postgres'
    JSON type rejects NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# --- the runner ---------------------------------------------------------------------------------------


@dataclass
class JobOutcome:
    """How a run ended: succeeded | failed | canceled | lost (lease gone) | skipped (not claimed)."""

    job_id: str
    state: str
    error_code: str | None = None
    error_message: str | None = None
    result_model_id: str | None = None
    restored_files: int = 0


@dataclass
class _RunState:
    """Per-run bookkeeping of the progress callback."""

    stage: str | None = None
    last_event: float = 0.0
    last_sync: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


class JobRunner:
    """Runs jobs from the jobs table. One runner per worker process; ``run`` handles one job at a time."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        blobs: BlobStore | None = None,
        worker_id: str | None = None,
        pipeline: PipelineFn | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings.database_url)
        self.sessions = session_factory(self.engine)
        self.blobs = blobs or make_blob_store(settings)
        self.worker_id = worker_id or default_worker_id()
        self.pipeline = pipeline
        assert settings.work_dir is not None  # filled in by Settings
        self.work_root = Path(settings.work_dir)

    # --- entry point ----------------------------------------------------------------------------------

    def run(self, job_id: str) -> JobOutcome:
        with self.sessions.begin() as session:
            if not leases.claim(session, job_id, self.worker_id, self.settings.lease_seconds):
                log.info("job %s: not claimable (finished, canceled or held by another worker)", job_id)
                return JobOutcome(job_id, "skipped")
        log.info("job %s: claimed by %s", job_id, self.worker_id)
        heartbeat = Heartbeat(
            self.sessions,
            job_id,
            self.worker_id,
            self.settings.lease_seconds,
            self.settings.heartbeat_seconds,
        )
        heartbeat.start()
        job_dir = self.work_root / job_id
        try:
            return self._run_claimed(job_id, job_dir, heartbeat)
        finally:
            heartbeat.stop()
            shutil.rmtree(job_dir, ignore_errors=True)

    def _run_claimed(self, job_id: str, job_dir: Path, heartbeat: Heartbeat) -> JobOutcome:
        mirror = WorkdirMirror(self.blobs, job_dir / "run", work_prefix(job_id))
        restored = 0
        try:
            restored = mirror.restore()
            if restored:
                from core.state import resume_point

                where = resume_point(mirror.local_dir)
                log.info("job %s: resuming at %s from %d stored work files", job_id, where, restored)
                with self.sessions.begin() as session:
                    leases.record_resumed(session, job_id, self.worker_id, where)
            config = self._job_config(job_id, job_dir / "inputs")
            state = _RunState()

            def on_progress(stage: str, fraction: float, metrics: dict[str, Any]) -> None:
                self._on_progress(job_id, heartbeat, mirror, state, stage, fraction, metrics)

            report = self._pipeline()(config, mirror.local_dir, on_progress, heartbeat.should_stop)
            mirror.sync()  # the finished state, in case the worker dies while the results are stored
            model_id = self._finish(job_id, mirror.local_dir / "out", report, heartbeat)
            log.info("job %s: succeeded; model %s", job_id, model_id)
            return JobOutcome(job_id, "succeeded", result_model_id=model_id, restored_files=restored)
        except jobs.LeaseLost:
            return JobOutcome(job_id, "lost", restored_files=restored)
        except Canceled:
            heartbeat.stop()
            if heartbeat.lease_lost.is_set():
                return JobOutcome(job_id, "lost", restored_files=restored)
            return self._end(job_id, "canceled", None, "canceled by request", restored)
        except (UserError, ValidationError) as error:
            heartbeat.stop()
            message = _one_line(error)
            log.info("job %s: failed: %s", job_id, message)
            return self._end(job_id, "failed", ERROR_INVALID_INPUT, message, restored)
        except Diverged as error:
            heartbeat.stop()
            log.info("job %s: diverged: %s", job_id, error)
            return self._end(job_id, "failed", ERROR_DIVERGED, str(error), restored)
        except Exception as error:
            log.exception("job %s: internal error", job_id)
            heartbeat.stop()
            return self._end(job_id, "failed", ERROR_INTERNAL, f"{type(error).__name__}: {error}", restored)

    def _pipeline(self) -> PipelineFn:
        if self.pipeline is None:
            from core.pipeline import run_pipeline  # torch and friends: imported only where jobs run

            self.pipeline = run_pipeline
        return self.pipeline

    # --- inputs ---------------------------------------------------------------------------------------

    def _job_config(self, job_id: str, inputs: Path) -> Any:
        """core's JobConfig with the teacher and datasets downloaded under ``inputs``."""
        from core.job import JobConfig

        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None  # we hold its lease
            stored = dict(job.config or {})
            teacher_id = stored.get("teacher_model_id") or job.teacher_model_id
            all_ids = [str(i) for i in job.dataset_ids or []] or [SAMPLE_DATASET_ID]
            train_ids = list(stored.get("train_dataset_ids") or all_ids)
            val_ids = list(stored.get("val_dataset_ids") or all_ids)
            if teacher_id is None:
                raise UserError("the job names no teacher model")
            teacher = self._download_model(session, teacher_id, inputs / "teacher")
            folders = {
                dataset_id: self._download_dataset(session, dataset_id, inputs / "datasets")
                for dataset_id in dict.fromkeys([*train_ids, *val_ids])
            }
        params = {key: value for key, value in stored.items() if key not in ID_FIELDS}
        return JobConfig.model_validate(
            {
                **params,
                "teacher_weights": teacher,
                "train_data": [folders[i] for i in train_ids],
                "val_data": [folders[i] for i in val_ids],
            }
        )

    def _download_model(self, session: Session, model_id: str, folder: Path) -> Path:
        """The model's files in ``folder``: a srcompress model dir (weights + config.json), or the
        single checkpoint file when the model has no stored config."""
        model = session.get(Model, model_id)
        if model is None or model.deleted_at is not None or not model.weights_key:
            raise UserError(f"teacher model {model_id} does not exist")
        folder.mkdir(parents=True, exist_ok=True)
        if model.config_key:
            self.blobs.download_to(model.weights_key, folder / WEIGHTS_FILE)
            self.blobs.download_to(model.config_key, folder / CONFIG_FILE)
            return folder
        return self.blobs.download_to(model.weights_key, folder / model.weights_key.rsplit("/", 1)[-1])

    def _download_dataset(self, session: Session, dataset_id: str, root: Path) -> Path:
        if dataset_id == SAMPLE_DATASET_ID:
            from core.data.sample import sample_dir

            return sample_dir(self.settings.data_dir / "cache")
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.deleted_at is not None:
            raise UserError(f"dataset {dataset_id} does not exist")
        # <id>/<name>: the report names a validation set by its folder, so that is the user's name for it.
        folder = root / dataset_id / _folder_name(dataset.name)
        if not download_dir(self.blobs, dataset.blob_prefix, folder):
            raise UserError(f"dataset {dataset_id} has no stored images")
        return folder

    # --- progress -------------------------------------------------------------------------------------

    def _on_progress(
        self,
        job_id: str,
        heartbeat: Heartbeat,
        mirror: WorkdirMirror,
        state: _RunState,
        stage: str,
        fraction: float,
        metrics: dict[str, Any],
    ) -> None:
        if heartbeat.lease_lost.is_set():
            raise jobs.LeaseLost(f"job {job_id}: lease lost")
        now = time.monotonic()
        metrics = jsonable(metrics)
        new_stage = stage != state.stage
        if new_stage or fraction >= 1.0 or now - state.last_event >= PROGRESS_MIN_SECONDS:
            state.metrics[stage] = {**state.metrics.get(stage, {}), **metrics}
            with self.sessions.begin() as session:
                self._record_progress(session, job_id, stage, fraction, metrics, dict(state.metrics))
            state.stage, state.last_event = stage, now
        # Upload new checkpoints: at most once per heartbeat, and whenever a stage begins.
        if new_stage or now - state.last_sync >= self.settings.heartbeat_seconds:
            mirror.sync()
            state.last_sync = now

    def _record_progress(
        self,
        session: Session,
        job_id: str,
        stage: str,
        fraction: float,
        metrics: dict[str, Any],
        all_metrics: dict[str, Any],
    ) -> None:
        job = jobs.lock_job(session, job_id)
        if job is None:
            raise jobs.LeaseLost(f"job {job_id} was deleted")
        current = job.state
        if stage not in jobs.RUNNING_STATES:
            return
        order = jobs.RUNNING_STATES.index
        if current == "queued" or (current in jobs.RUNNING_STATES and order(stage) > order(current)):
            jobs.transition(session, job, stage, worker_id=self.worker_id, metrics=all_metrics)
            if fraction > 0:
                jobs.report_progress(session, job_id, fraction, worker_id=self.worker_id, metrics=metrics)
        elif stage == current:
            jobs.report_progress(session, job_id, fraction, worker_id=self.worker_id, metrics=metrics)
            job.metrics = all_metrics
        # else: a resumed run replaying an earlier, finished stage; nothing to record

    # --- endings --------------------------------------------------------------------------------------

    def _finish(self, job_id: str, out: Path, report: Any, heartbeat: Heartbeat) -> str:
        """Store artifacts and the compact model, then mark the job succeeded (one transaction). The
        heartbeat keeps the lease during the uploads and stops before the final transition ends it."""
        model_id = new_id()
        artifacts = []
        for path in sorted(p for p in out.iterdir() if p.is_file()):
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            key = artifact_key(job_id, path.name)
            self.blobs.put_file(key, path, content_type=content_type)
            artifacts.append(
                Artifact(
                    job_id=job_id,
                    name=path.name,
                    blob_key=key,
                    content_type=content_type,
                    size=path.stat().st_size,
                )
            )
        formats = [f.model_dump(mode="json") for f in report.quantize.formats] if report.quantize else []
        keys = put_model_files(self.blobs, model_id, out, formats)
        student = report.student
        config = jsonable(student.config)
        first_score = student.scores[0] if student.scores else None
        model_metrics = {
            "lr_size": list(student.lr_size),
            "params_excl_rpb": student.params_excl_rpb,
            "scores": [score.model_dump() for score in student.scores],
            "psnr": first_score.psnr if first_score else None,
            "ssim": first_score.ssim if first_score else None,
            "latency_ms": student.latency_ms,
            "job_id": job_id,
        }
        report_json = jsonable(report.model_dump(mode="json", by_alias=True))
        heartbeat.stop()
        if heartbeat.lease_lost.is_set():
            raise jobs.LeaseLost(f"job {job_id}: lease lost before the results were recorded")
        with self.sessions.begin() as session:
            job = jobs.lock_job(session, job_id)
            assert job is not None
            register_model(
                session,
                model_id,
                out,
                keys,
                owner_key_id=job.owner_key_id,
                name=f"{report.params.model}-x{config['scale']}-compact-{job_id[:8]}",
                family=config["family"],
                scale=int(config["scale"]),
                config=config,
                source="job",
                params=student.params,
                macs=student.macs,
                metrics=jsonable(model_metrics),
                formats=jsonable(formats),
            )
            session.add_all(artifacts)
            session.flush()  # the model row must exist before the job refers to it
            jobs.transition(
                session,
                job,
                "succeeded",
                worker_id=self.worker_id,
                message="succeeded",
                metrics={**(job.metrics or {}), "student": jsonable(model_metrics)},
                report=report_json,
                result_model_id=model_id,
            )
        return model_id

    def _end(
        self, job_id: str, state: str, error_code: str | None, message: str, restored: int
    ) -> JobOutcome:
        """Move the job to ``canceled`` or ``failed``; a lost lease means someone else owns it now."""
        message = message[:MAX_ERROR_MESSAGE]
        try:
            with self.sessions.begin() as session:
                jobs.transition(
                    session,
                    job_id,
                    state,
                    worker_id=self.worker_id,
                    message=message,
                    error_code=error_code,
                    error_message=message if state == "failed" else None,
                )
        except jobs.LeaseLost:
            return JobOutcome(job_id, "lost", restored_files=restored)
        return JobOutcome(
            job_id, state, error_code, message if state == "failed" else None, restored_files=restored
        )


def _one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "invalid job config: " + describe_validation_error(error.errors())
    return " ".join(str(error).split())


def _folder_name(name: str) -> str:
    """A dataset's name as a folder name: letters, digits, '.', '_' and '-' kept, the rest '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:64]
    return safe or "dataset"
