"""Run one compression job on this worker: plain Python, called by the Celery task (worker/tasks.py).

``JobRunner(settings).run(job_id)``:

1. claims the job's lease (``store.jobs.claim``); a job that is not queued, or that another worker
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

Blob layout: ``jobs/<id>/work/...`` (work dir mirror), ``jobs/<id>/artifacts/<name>``,
``models/<model id>/{model.safetensors,config.json,model.onnx}``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mimetypes
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.errors import Canceled, Diverged, UserError
from store import jobs
from store.blobs import BlobStore, make_blob_store, normalize_prefix
from store.db import make_engine, session_factory
from store.settings import Settings
from store.tables import Artifact, Dataset, Job, Model, new_id

log = logging.getLogger("srcompress.worker")

SAMPLE_DATASET_ID = "sample"  # the bundled images; the API lists it as a dataset too
# Keys of a job's stored config that name inputs by id; everything else is core's JobParams.
ID_FIELDS = ("teacher_model_id", "train_dataset_ids", "val_dataset_ids")
PROGRESS_MIN_SECONDS = 1.0
SKIPPED_SUFFIXES = (".tmp", ".part")  # files being written; their final name is uploaded later
ERROR_INVALID_INPUT = "invalid_input"
ERROR_INTERNAL = "internal"
ERROR_DIVERGED = "diverged"  # a training loss stopped being finite
MAX_ERROR_MESSAGE = 2000

PipelineFn = Callable[..., Any]  # core.pipeline.run_pipeline's signature


def work_prefix(job_id: str) -> str:
    """Blob folder of the job's work dir mirror (checkpoints, state.json)."""
    return f"jobs/{job_id}/work/"


def artifact_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/artifacts/{name}"


def model_key(model_id: str, name: str) -> str:
    return f"models/{model_id}/{name}"


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


# --- the work dir mirror ------------------------------------------------------------------------------


class WorkdirMirror:
    """Keeps ``blobs[prefix]`` a copy of ``local_dir``, uploading only files that changed since the last
    sync (by size and mtime). Called from the training thread, between steps, so no file is half written
    (core writes checkpoints to a temp name and renames them)."""

    def __init__(self, blobs: BlobStore, local_dir: Path, prefix: str) -> None:
        self.blobs = blobs
        self.local_dir = local_dir
        self.prefix = normalize_prefix(prefix)
        self.synced: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) in storage

    def _local_files(self) -> dict[str, tuple[int, int]]:
        files = {}
        for path in sorted(self.local_dir.rglob("*")):
            if path.is_file() and not path.name.endswith(SKIPPED_SUFFIXES):
                stat = path.stat()
                files[path.relative_to(self.local_dir).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        return files

    def restore(self) -> int:
        """Replace the local dir by the stored mirror; returns the number of files restored."""
        shutil.rmtree(self.local_dir, ignore_errors=True)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        keys = self.blobs.list(self.prefix)
        for key in keys:
            self.blobs.download_to(key, self.local_dir / key[len(self.prefix) :])
        self.synced = self._local_files()
        return len(keys)

    def sync(self) -> list[str]:
        """Upload new and changed files, delete stored files that no longer exist; returns the uploaded
        relative paths. state.json goes last, so the stored state never names a result whose files
        are not stored yet."""
        current = self._local_files()
        changed = [rel for rel, stamp in current.items() if self.synced.get(rel) != stamp]
        changed.sort(key=lambda rel: rel == "state.json")
        for rel in changed:
            self.blobs.put_file(self.prefix + rel, self.local_dir / rel)
            self.synced[rel] = current[rel]
        for rel in [rel for rel in self.synced if rel not in current]:
            self.blobs.delete(self.prefix + rel)
            del self.synced[rel]
        return changed


# --- the lease heartbeat ------------------------------------------------------------------------------


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
                if jobs.heartbeat(session, self.job_id, self.worker_id, self.lease_seconds):
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
            if not jobs.claim(session, job_id, self.worker_id, self.settings.lease_seconds):
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
                from core.pipeline import resume_point

                where = resume_point(mirror.local_dir)
                log.info("job %s: resuming at %s from %d stored work files", job_id, where, restored)
                with self.sessions.begin() as session:
                    jobs.record_resumed(session, job_id, self.worker_id, where)
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
        from core.pipeline import JobConfig

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
        from core.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

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
        folder = root / dataset_id
        keys = self.blobs.list(dataset.blob_prefix)
        if not keys:
            raise UserError(f"dataset {dataset_id} has no stored images")
        prefix = normalize_prefix(dataset.blob_prefix)
        for key in keys:
            self.blobs.download_to(key, folder / key[len(prefix) :])
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
        from core.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

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
        keys = {}
        for name in (WEIGHTS_FILE, CONFIG_FILE, "model.onnx"):
            if (out / name).is_file():
                keys[name] = model_key(model_id, name)
                self.blobs.put_file(keys[name], out / name)
        if WEIGHTS_FILE not in keys or CONFIG_FILE not in keys:
            raise RuntimeError(f"the pipeline left no {WEIGHTS_FILE} + {CONFIG_FILE} in {out}")

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
            session.add(
                Model(
                    id=model_id,
                    owner_key_id=job.owner_key_id,
                    name=f"{report.params.model}-x{config['scale']}-compact-{job_id[:8]}",
                    family=config["family"],
                    scale=int(config["scale"]),
                    config=config,
                    source="job",
                    params=student.params,
                    macs=student.macs,
                    metrics=jsonable(model_metrics),
                    weights_key=keys[WEIGHTS_FILE],
                    weights_sha256=_sha256(out / WEIGHTS_FILE),
                    config_key=keys[CONFIG_FILE],
                    onnx_key=keys.get("model.onnx"),
                )
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
        parts = [f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()]
        return "invalid job config: " + "; ".join(parts)
    return " ".join(str(error).split())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
