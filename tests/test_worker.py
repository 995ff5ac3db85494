"""The compression worker against the production topology: Postgres, Redis as the Celery broker, S3 served
by moto over HTTP, and real `celery worker` processes (solo pool, so that kill -9 kills the job).

Jobs are inserted through store/ (as the API would) and sent with ``worker.app.enqueue_job``. They are
tiny (edsr_mini teacher with random weights, 2 pruning steps, a few distillation steps, 16 px patches) so
that a whole job takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

from store import jobs, leases
from store.apikeys import create_api_key
from store.blobs import BlobStore, make_blob_store, upload_dir
from store.db import init_db, make_engine, session_factory
from store.keys import work_prefix
from store.queue import worker_command
from store.settings import Settings
from store.tables import Artifact, Dataset, Job, JobEvent, Model, utcnow
from tests.service_helpers import unavailable, wait_for
from tests.stores import moto_s3_server, postgres_unavailable_reason, throwaway_postgres_database
from worker.app import create_celery_app, enqueue_job
from worker.reaper import PURGED_MESSAGE

pytestmark = [pytest.mark.service, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
REDIS_URL_BASE = "redis://127.0.0.1:6379"
LEASE_SECONDS = 4
HEARTBEAT_SECONDS = 1
TINY_JOB = {
    "model": "edsr_mini",
    "scale": 2,
    "prune_iters": 2,
    "distill_iters": 12,
    "batch_size": 2,
    "patch_size": 16,
    "target_params": 20_000,  # the teacher has 49.6k; 2 pruning steps alone would not shrink it
    "validate_every": 0,
    "checkpoint_every": 5,
    "device": "cpu",
}


def redis_unavailable_reason() -> str | None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL_BASE, socket_connect_timeout=2).ping()
    except Exception as error:
        return f"Redis at {REDIS_URL_BASE} unreachable: {error}"
    return None


# --- the stack ----------------------------------------------------------------------------------------


class Stack:
    """Settings (as environment and as an object), sessions and blobs of one test module's services."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.settings = Settings(**{k.removeprefix("SRCOMPRESS_").lower(): v for k, v in env.items()})
        self.engine = make_engine(self.settings.database_url)
        self.sessions = session_factory(self.engine)
        self.blobs: BlobStore = make_blob_store(self.settings)
        self.celery = create_celery_app(self.settings)
        self.workers: list[subprocess.Popen] = []

    def start_worker(self, name: str) -> subprocess.Popen:
        log_path = self.tmp / f"{name}.log"
        command = [*worker_command("solo", hostname=f"{name}@%h"), "--without-heartbeat"]
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **self.env},
            stdout=open(log_path, "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        self.workers.append(process)
        wait_for(
            lambda: b"ready." in log_path.read_bytes() or process.poll() is not None, 60, f"{name} ready"
        )
        assert process.poll() is None, log_path.read_text()[-3000:]
        return process

    def stop_workers(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.workers.clear()

    def job(self, job_id: str) -> Job:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def events(self, job_id: str) -> list[JobEvent]:
        with self.sessions() as session:
            return jobs.events_after(session, job_id)

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> Job:
        return wait_for(
            lambda: (job := self.job(job_id)).state in states and job, timeout, f"job {job_id} in {states}"
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    for reason in (postgres_unavailable_reason(), redis_unavailable_reason()):
        if reason:
            unavailable(reason)
    tmp = tmp_path_factory.mktemp("worker")
    with throwaway_postgres_database() as database_url, moto_s3_server() as s3_endpoint:
        engine = make_engine(database_url)
        init_db(engine)
        engine.dispose()
        env = {
            "SRCOMPRESS_DATA_DIR": str(tmp / "data"),
            "SRCOMPRESS_DATABASE_URL": database_url,
            # A database of its own on the shared Redis, so that other suites' workers never take our jobs.
            "SRCOMPRESS_BROKER_URL": f"{REDIS_URL_BASE}/{random.randint(8, 15)}",
            "SRCOMPRESS_BLOB_BACKEND": "s3",
            "SRCOMPRESS_S3_ENDPOINT_URL": s3_endpoint,
            "SRCOMPRESS_S3_BUCKET": f"worker-{os.urandom(4).hex()}",
            "SRCOMPRESS_S3_ACCESS_KEY": "testing",
            "SRCOMPRESS_S3_SECRET_KEY": "testing",
            "SRCOMPRESS_LEASE_SECONDS": str(LEASE_SECONDS),
            "SRCOMPRESS_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "SRCOMPRESS_MAX_ATTEMPTS": "3",
            "SRCOMPRESS_CHECKPOINT_RETENTION_SECONDS": "0",
        }
        stack = Stack(env, tmp)
        try:
            yield stack
        finally:
            stack.stop_workers()
            stack.engine.dispose()


@pytest.fixture
def workers(stack: Stack) -> Iterator[Stack]:
    """The stack; every worker a test starts is stopped after it."""
    yield stack
    stack.stop_workers()


@pytest.fixture(scope="module")
def inputs(stack: Stack) -> dict[str, str]:
    """An owner key, a teacher model (edsr_mini x2, random weights) and a 3-image dataset, stored."""
    from core.models.build import create_model
    from core.models.checkpoint import save_model

    torch.manual_seed(0)
    save_model(create_model("edsr_mini", 2), stack.tmp / "teacher")
    upload_dir(stack.blobs, stack.tmp / "teacher", "models/teacher")
    save_model(create_model("edsr_mini", 3), stack.tmp / "x3")
    upload_dir(stack.blobs, stack.tmp / "x3", "models/x3")
    images = stack.tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 48 * 48 * 3).reshape(48, 48, 3)
    for i in range(3):
        pixels = np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{i}.png")
    upload_dir(stack.blobs, images, "datasets/tiny")
    with stack.sessions.begin() as session:
        key, _raw = create_api_key(session, "worker-tests")
        teacher = Model(
            owner_key_id=key.id,
            name="teacher",
            family="edsr",
            scale=2,
            source="upload",
            weights_key="models/teacher/model.safetensors",
            config_key="models/teacher/config.json",
        )
        wrong = Model(  # an x3 model: a job asking for x2 must fail with a clear message
            owner_key_id=key.id,
            name="wrong",
            family="edsr",
            scale=3,
            source="upload",
            weights_key="models/x3/model.safetensors",
            config_key="models/x3/config.json",
        )
        dataset = Dataset(
            owner_key_id=key.id, name="tiny", kind="train", blob_prefix="datasets/tiny", image_count=3
        )
        session.add_all([teacher, wrong, dataset])
        session.flush()
        ids = {"owner": key.id, "teacher": teacher.id, "wrong": wrong.id, "dataset": dataset.id}
    return ids


def submit(
    stack: Stack, inputs: dict[str, str], *, teacher: str = "teacher", train: str = "tiny", **overrides: Any
) -> str:
    """Insert a queued job the way the API does and send its task. It trains on `train` ('sample', the
    bundled set, or 'tiny', the stored 3-image dataset) and validates on 'tiny'."""
    train_id = "sample" if train == "sample" else inputs["dataset"]
    config = {
        **TINY_JOB,
        **overrides,
        "teacher_model_id": inputs[teacher],
        "train_dataset_ids": [train_id],
        "val_dataset_ids": [inputs["dataset"]],
    }
    with stack.sessions.begin() as session:
        job, created = jobs.create_job(
            session,
            config=config,
            owner_key_id=inputs["owner"],
            teacher_model_id=inputs[teacher],
            dataset_ids=sorted({train_id, inputs["dataset"]}),
        )
        assert created
        job_id = job.id
    enqueue_job(job_id, stack.celery)
    return job_id


def stored_iteration(stack: Stack, key: str) -> int:
    state = torch.load(io.BytesIO(stack.blobs.get_bytes(key)), map_location="cpu", weights_only=True)
    return int(state["iteration"])


# --- tests --------------------------------------------------------------------------------------------


def test_job_succeeds_with_events_artifacts_and_a_registered_model(workers: Stack, inputs):
    stack = workers
    stack.start_worker("w-success")
    # Only a size target and a time budget: the fast recipe, its iteration counts planned on the worker.
    job_id = submit(stack, inputs, train="sample", prune_iters=None, distill_iters=None, budget_minutes=0.1)
    job = stack.wait_state(job_id, ("succeeded", "failed", "canceled"), 240)
    assert job.state == "succeeded", (job.error_code, job.error_message)
    assert job.attempts == 1 and job.lease_owner is None and job.progress == 1.0

    events = stack.events(job_id)
    states = [event.state for event in events]
    distinct = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    print("event states:", distinct, "events:", len(events))
    assert distinct[: len(jobs.RUNNING_STATES) + 2] == ["queued", *jobs.RUNNING_STATES, "succeeded"]
    assert [event.seq for event in events] == list(range(1, len(events) + 1))
    distill = [event.fraction for event in events if event.state == "distilling"]
    assert distill == sorted(distill) and distill[-1] == 1.0

    with stack.sessions() as session:
        artifacts = {
            a.name: a for a in session.execute(select(Artifact).where(Artifact.job_id == job_id)).scalars()
        }
        model = session.get(Model, job.result_model_id)
    assert {"report.json", "model.safetensors", "config.json", "model.onnx", "MODEL_CARD.md"} <= set(
        artifacts
    )
    assert {"psnr_vs_params.png", "crops.png"} <= set(artifacts)
    for artifact in artifacts.values():
        assert stack.blobs.size(artifact.blob_key) == artifact.size > 0
    assert artifacts["psnr_vs_params.png"].content_type == "image/png"

    report = job.report
    assert model is not None and model.source == "job" and model.owner_key_id == inputs["owner"]
    assert (model.family, model.scale) == ("edsr", 2)
    assert model.params == report["student"]["params"] < report["teacher"]["params"]
    print(
        "student params",
        model.params,
        "teacher params",
        report["teacher"]["params"],
        "psnr",
        model.metrics["psnr"],
    )
    recipe = report["recipe"]
    assert recipe["name"] == "fast" and recipe["overridden"] == ["batch_size", "patch_size"]  # TINY_JOB's
    distill = report["distill"]
    assert distill["planned_iterations"] == report["budget"]["distill_iters"] >= 1
    planned = distill["replan"]["iterations"] if distill["replan"] else distill["planned_iterations"]
    ran = distill["iterations"]  # all of them, unless a slowed machine hit the deadline
    assert ran == planned or (distill["stopped_early"] and ran < planned)
    assert job.metrics["distilling"]["iteration"] == ran and "eta_s" in job.metrics["distilling"]
    # Chosen on a sample image held out from training; the stored 'tiny' set is reported beside it.
    assert [g["used_for_selection"] for g in report["gaps"]] == [True, False]
    assert report["holdout"]["training_images"] == 5 and len(report["holdout"]["images"]) == 1

    # The registered model is a loadable srcompress model (weights + config from its blobs).
    from core.models.checkpoint import load_checkpoint

    folder = stack.tmp / f"result-{job_id}"
    stack.blobs.download_to(model.weights_key, folder / "model.safetensors")
    stack.blobs.download_to(model.config_key, folder / "config.json")
    assert stack.blobs.exists(model.onnx_key)
    import hashlib

    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == model.weights_sha256
    student, _ = load_checkpoint(folder, family="edsr", scale=2)
    with torch.no_grad():
        assert student(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)

    # Retention 0: the reaper purges the stored checkpoints soon after the end, keeping the artifacts.
    # The reaper deletes the mirror first and then records the event, so wait for the event.
    wait_for(
        lambda: any(event.message == PURGED_MESSAGE for event in stack.events(job_id)), 30, "the purge event"
    )
    assert not stack.blobs.list(work_prefix(job_id))
    assert all(stack.blobs.exists(artifact.blob_key) for artifact in artifacts.values())


def test_cancel_stops_the_running_job_and_the_worker_takes_the_next(workers: Stack, inputs):
    stack = workers
    stack.start_worker("w-cancel")
    long_job = submit(stack, inputs, distill_iters=100_000)
    bad_job = submit(stack, inputs, teacher="wrong")  # queued behind the long one
    diverging_job = submit(stack, inputs, distill_lr=1e6)  # finite, absurd: its loss becomes NaN
    stack.wait_state(long_job, ("distilling",), 120)
    assert stack.job(bad_job).state == "queued"

    with stack.sessions.begin() as session:
        jobs.request_cancel(session, long_job)
    asked = time.monotonic()
    job = stack.wait_state(long_job, ("canceled", "failed", "succeeded"), 30)
    print(f"canceled after {time.monotonic() - asked:.1f} s")
    assert job.state == "canceled" and job.lease_owner is None
    # Progress events (no message) may land between the request and the stop, and the reaper may
    # already have appended its "checkpoints purged" event after the end.
    messages = [e.message for e in stack.events(long_job) if e.message and e.message != "checkpoints purged"]
    assert messages[-2:] == ["cancel requested", "canceled by request"]

    # The same worker is free and runs the next job, which fails with a clear user-facing message.
    job = stack.wait_state(bad_job, ("failed", "succeeded", "canceled"), 60)
    print("next job:", job.state, job.error_code, job.error_message)
    assert (job.state, job.error_code) == ("failed", "invalid_input")
    assert job.error_message and "\n" not in job.error_message

    # A loss that stops being finite fails the job as `diverged`, says where, and registers no model.
    job = stack.wait_state(diverging_job, ("failed", "succeeded", "canceled"), 120)
    print("diverging job:", job.state, job.error_code, job.error_message)
    assert (job.state, job.error_code, job.result_model_id) == ("failed", "diverged", None)
    assert "at iteration" in job.error_message and "last finite loss" in job.error_message


def test_killed_worker_job_is_requeued_and_resumes_from_its_stored_checkpoint(workers: Stack, inputs):
    stack = workers
    first = stack.start_worker("w-doomed")
    # Long enough (a few seconds) that the kill lands in distillation however fast the machine.
    job_id = submit(stack, inputs, distill_iters=300, checkpoint_every=5)
    checkpoint_key = work_prefix(job_id) + "distilling.pt"
    wait_for(lambda: stack.blobs.exists(checkpoint_key), 180, "a stored distillation checkpoint")
    stored = stored_iteration(stack, checkpoint_key)
    assert stack.job(job_id).state == "distilling", "the job finished distilling before the kill"
    first.send_signal(signal.SIGKILL)
    first.wait()
    print("killed mid-distill; stored checkpoint at iteration", stored)

    stack.start_worker("w-rescuer")  # its reaper re-queues the job once the lease expires
    job = stack.wait_state(job_id, ("succeeded", "failed", "canceled"), 300)
    assert job.state == "succeeded", (job.error_code, job.error_message)
    assert job.attempts == 2

    events = stack.events(job_id)
    requeued = next(i for i, e in enumerate(events) if e.message == "worker lost; re-queued")
    assert events[requeued].state == "queued"
    resumed = [
        e.metrics["iteration"]
        for e in events[requeued:]
        if e.state == "distilling" and e.metrics and "iteration" in e.metrics
    ]
    before = [
        e.metrics["iteration"]
        for e in events[:requeued]
        if e.state == "distilling" and e.metrics and "iteration" in e.metrics
    ]
    print("distill iterations reported before the kill:", before, "after:", resumed[:3], "...")
    # The resumed run continued after the stored checkpoint instead of starting again at iteration 0.
    assert resumed and resumed[0] > stored >= 5
    assert job.report["distill"]["iterations"] == 300


def test_job_whose_worker_was_lost_max_attempts_times_fails_worker_lost(workers: Stack, inputs):
    stack = workers
    with stack.sessions.begin() as session:
        job, _ = jobs.create_job(session, config=dict(TINY_JOB), owner_key_id=inputs["owner"])
        job_id = job.id
    # Three workers took the job and vanished: the third lease has expired and attempts are used up.
    for attempt in range(3):
        with stack.sessions.begin() as session:
            earlier = utcnow() - timedelta(seconds=60 - attempt)
            assert leases.claim(session, job_id, f"ghost-{attempt}", LEASE_SECONDS, now=earlier)
            if attempt < 2:
                leases.requeue(session, job_id, max_attempts=3, now=earlier)
    with stack.sessions.begin() as session:
        jobs.transition(
            session, job_id, "distilling", worker_id="ghost-2", now=utcnow() - timedelta(seconds=50)
        )

    stack.start_worker("w-reaper")
    job = stack.wait_state(job_id, ("failed", "queued", "succeeded", "canceled"), 30)
    print("after 3 losses:", job.state, job.error_code, job.error_message)
    assert (job.state, job.error_code, job.attempts) == ("failed", "worker_lost", 3)
