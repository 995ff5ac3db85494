"""The whole job lifecycle through HTTP with a real Celery worker process, on both topologies:

- production: Postgres + Redis (broker) + moto S3 over HTTP, `uvicorn api.app:app` + `celery -A worker.app`;
- embedded: `srcompress serve` (SQLite + local blobs + kombu's SQLAlchemy broker; it starts the worker).

submit → progress events (SSE) → succeeded → report/artifacts → download the compact model → upscale with it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from core.models.build import create_model
from core.models.config import parse_config
from store import jobs as store_jobs
from store.blobs import make_blob_store
from store.db import migrate
from store.keys import work_prefix
from store.settings import Settings
from tests.service_helpers import (
    REPO,
    create_key,
    embedded_server,
    parse_sse,
    png_bytes,
    stop,
    unavailable,
    uvicorn_server,
    wait_for,
    zip_bytes,
)
from tests.stores import free_port, moto_s3_server, postgres_unavailable_reason, throwaway_postgres_database

pytestmark = [pytest.mark.service, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/14"
JOB_TIMEOUT_S = 420


@contextmanager
def celery_worker(env: dict[str, str], log_path: Path):
    from store.queue import worker_command

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            worker_command(), env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        stop(process, timeout=30)


@contextmanager
def production_services(tmp: Path, **settings: str):
    """Postgres (a throwaway database), Redis and moto S3; yields the SRCOMPRESS_* environment."""
    reason = postgres_unavailable_reason()
    if reason:
        unavailable(reason)
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()
    except Exception as error:
        unavailable(f"Redis at {REDIS_URL} unreachable: {error}")
    with throwaway_postgres_database() as database_url, moto_s3_server() as s3_url:
        migrate(database_url)
        yield {
            "SRCOMPRESS_DATA_DIR": str(tmp / "data"),
            "SRCOMPRESS_DATABASE_URL": database_url,
            "SRCOMPRESS_BROKER_URL": REDIS_URL,
            "SRCOMPRESS_BLOB_BACKEND": "s3",
            "SRCOMPRESS_S3_ENDPOINT_URL": s3_url,
            "SRCOMPRESS_S3_BUCKET": "srcompress-lifecycle",
            "SRCOMPRESS_S3_ACCESS_KEY": "testing",
            "SRCOMPRESS_S3_SECRET_KEY": "testing",
            **{f"SRCOMPRESS_{name.upper()}": value for name, value in settings.items()},
        }
    redis.Redis.from_url(REDIS_URL).flushdb()


@contextmanager
def production_stack(tmp: Path):
    with ExitStack() as stack:
        env = stack.enter_context(production_services(tmp))
        key = create_key(env, "lifecycle")
        url = stack.enter_context(uvicorn_server(env, free_port(), tmp / "uvicorn.log"))
        stack.enter_context(
            celery_worker({**env, "SRCOMPRESS_DATA_DIR": str(tmp / "worker")}, tmp / "worker.log")
        )
        yield url, key, [tmp / "uvicorn.log", tmp / "worker.log"]


@contextmanager
def embedded_stack(tmp: Path):
    """`srcompress serve` with only a data directory: it migrates, prints the first key, starts a worker."""
    with embedded_server(tmp) as (url, key, log_path):
        yield url, key, [log_path]


def follow_events(client: httpx.Client, job_id: str) -> list[dict]:
    """Every event of the job until the stream ends (the job finished)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    events: list[dict] = []
    last_id = None
    while time.monotonic() < deadline:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        timeout = httpx.Timeout(10, read=60)
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith(
                "text/event-stream"
            )
            text = "".join(response.iter_text())
        for message in parse_sse(text):
            if message.get("event") == "end":
                return events
            events.append(json.loads(message["data"]))
            last_id = message["id"]
    raise AssertionError(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s; events: {events[-5:]}")


@pytest.mark.parametrize("topology", ["production", "embedded"])
def test_job_lifecycle(topology, tmp_path):
    make_stack = production_stack if topology == "production" else embedded_stack
    with make_stack(tmp_path) as (url, key, logs):
        try:
            run_lifecycle(url, key, topology)
        except BaseException:
            for log in logs:
                if log.exists():
                    print(f"--- {log.name} ---\n{log.read_text()[-6000:]}")
            raise


def run_lifecycle(url: str, key: str, topology: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        torch.manual_seed(0)
        buffer = io.BytesIO()
        torch.save(create_model("rlfn_s", 2).state_dict(), buffer)
        teacher = client.post("/v1/models", files={"file": ("teacher.pth", buffer.getvalue())})
        assert teacher.status_code == 201, teacher.text

        # A few small images keep the CPU job short (the bundled `sample` set works too, only slower).
        images = {f"{i}.png": png_bytes(48, 48, seed=i) for i in range(4)}
        dataset = client.post("/v1/datasets", files={"file": ("tiny.zip", zip_bytes(images))})
        assert dataset.status_code == 201, dataset.text

        body = {
            "model": "rlfn_s",
            "scale": 2,
            "teacher_model_id": teacher.json()["id"],
            "train_dataset_ids": [dataset.json()["id"]],
            "val_dataset_ids": [dataset.json()["id"]],
            "lambda": 1e-3,
            "prune_iters": 2,
            "distill_iters": 4,
            "batch_size": 2,
            "patch_size": 16,
            "validate_every": 0,
            "checkpoint_every": 2,
            "device": "cpu",
            "formats": ["onnx", "onnx_int8"],
            "calibration": "minmax",
            "calibration_patches": 8,
        }
        submitted = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"lifecycle-{topology}"})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]

        events = follow_events(client, job_id)
        states = [event["state"] for event in events]
        print(f"{topology}: {len(events)} events, states {list(dict.fromkeys(states))}")
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job
        assert states[0] == "queued" and states[-1] == "succeeded"
        running = [s for s in dict.fromkeys(states) if s not in ("queued", "succeeded")]
        assert running and running == sorted(running, key=store_jobs.RUNNING_STATES.index)
        assert running[0] == "preparing"  # out of queued as soon as a worker claimed it
        assert len(events) >= len(running) + 2
        assert job["result_model_id"] and job["finished_at"]

        report = client.get(f"/v1/jobs/{job_id}/report").json()
        # A random teacher with 2 pruning steps may not shrink (report.pruning_ineffective); never grows.
        assert report["student"]["params"] <= report["teacher"]["params"]
        assert {"teacher", "student", "prune", "distill", "export"} <= set(report)
        artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()}
        card = [name for name in artifacts if name.endswith("MODEL_CARD.md")]
        assert card, artifacts
        assert client.get(artifacts[card[0]]["url"]).status_code == 200

        # The compact model is a model like any other: listed, downloadable, usable.
        result = client.get(f"/v1/models/{job['result_model_id']}").json()
        assert result["source"] == "job" and result["params"] == report["student"]["params"]
        links = {
            link["name"]: link["url"] for link in client.get(f"/v1/models/{result['id']}/download").json()
        }
        fetch = httpx.get if links["model.safetensors"].startswith("http") else client.get
        tensors = load_safetensors(fetch(links["model.safetensors"]).content)
        config = parse_config(fetch(links["config.json"]).content)
        assert config.family == "rlfn" and config.scale == 2
        assert sum(t.numel() for t in tensors.values()) == result["params"]

        upscaled = client.post(
            "/v1/upscale", files={"file": ("in.png", png_bytes(36, 28))}, data={"model_id": result["id"]}
        )
        assert upscaled.status_code == 200, upscaled.text
        assert Image.open(io.BytesIO(upscaled.content)).size == (72, 56)

        # The formats the job asked for: listed with their figures, downloadable, served on request.
        formats = {f["name"]: f for f in result["formats"]}
        print(f"{topology}: formats {formats}")
        assert set(formats) == {"onnx", "onnx_int8"} and all(f["ok"] for f in formats.values())
        assert formats["onnx"]["parity_db"] >= 80 and formats["onnx_int8"]["parity_db"] > 30
        assert all(f["latency_ms"] > 0 and f["bytes"] > 0 for f in formats.values())
        assert fetch(links["model_int8.onnx"]).content[:2] and "model_int8.onnx" in result["files"]
        int8 = client.post(
            "/v1/upscale",
            files={"file": ("in.png", png_bytes(36, 28))},
            data={"model_id": result["id"], "precision": "int8"},
        )
        assert int8.status_code == 200, int8.text
        assert int8.headers["X-Srcompress-Precision"] == "int8"
        assert int8.headers["X-Srcompress-Backend"] == "onnx_int8"
        assert Image.open(io.BytesIO(int8.content)).size == (72, 56)

        # The idempotent retry of the finished submission still answers the same job.
        again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"lifecycle-{topology}"})
        assert again.json()["id"] == job_id and again.json()["state"] == "succeeded"


# --- cancel and a lost worker, through HTTP -----------------------------------------------------------

LEASE_SECONDS = 4  # short, so that the reaper notices the killed worker within seconds


def wait_for_job(client: httpx.Client, job_id: str, done, timeout: float, what: str) -> dict:
    """The job (GET /v1/jobs/{id}) once `done(job)` holds."""

    def finished() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if done(job) else None

    return wait_for(finished, timeout, what)


def job_events(client: httpx.Client, job_id: str) -> list[dict]:
    """Every event so far (`follow=false`: the stream ends after the backlog, even for a running job)."""
    url = f"/v1/jobs/{job_id}/events?follow=false"
    with client.stream("GET", url, timeout=httpx.Timeout(10, read=60)) as response:
        text = "".join(response.iter_text())
    return [json.loads(m["data"]) for m in parse_sse(text) if m.get("event") != "end"]


def distilled(job: dict) -> int:
    """The latest distillation iteration a job's metrics report (0 before distillation)."""
    return (job["metrics"] or {}).get("distilling", {}).get("iteration", 0)


def distill_iterations(events: list[dict]) -> list[int]:
    return [
        e["metrics"]["iteration"]
        for e in events
        if e["state"] == "distilling" and e.get("metrics") and "iteration" in e["metrics"]
    ]


def test_cancel_and_killed_worker_through_http(tmp_path):
    """On the production topology, driven by HTTP: cancel stops a running job within seconds and frees
    its worker; a worker SIGKILLed mid-distillation loses nothing: the reaper re-queues its job, which
    resumes from its stored checkpoint on another worker and succeeds."""
    settings = {"lease_seconds": str(LEASE_SECONDS), "heartbeat_seconds": "1", "max_attempts": "3"}
    with ExitStack() as stack:
        env = stack.enter_context(production_services(tmp_path, **settings))
        key = create_key(env, "recovery")
        url = stack.enter_context(uvicorn_server(env, free_port(), tmp_path / "uvicorn.log"))
        worker_env = {**env, "SRCOMPRESS_DATA_DIR": str(tmp_path / "worker")}
        first = stack.enter_context(celery_worker(worker_env, tmp_path / "worker-1.log"))
        client = stack.enter_context(
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        )
        logs = [tmp_path / name for name in ("uvicorn.log", "worker-1.log", "worker-2.log")]
        try:
            torch.manual_seed(0)
            buffer = io.BytesIO()
            torch.save(create_model("rlfn_s", 2).state_dict(), buffer)
            teacher = client.post("/v1/models", files={"file": ("teacher.pth", buffer.getvalue())}).json()
            images = {f"{i}.png": png_bytes(48, 48, seed=i) for i in range(3)}
            dataset = client.post("/v1/datasets", files={"file": ("tiny.zip", zip_bytes(images))}).json()
            body = {
                "model": "rlfn_s",
                "scale": 2,
                "teacher_model_id": teacher["id"],
                "train_dataset_ids": [dataset["id"]],
                "val_dataset_ids": [dataset["id"]],
                "target_params": 20_000,
                "prune_iters": 2,
                "batch_size": 2,
                "patch_size": 16,
                "validate_every": 0,
                "device": "cpu",
            }

            # Cancel: a job that would run for hours ends `canceled` within seconds of the request.
            long_job = client.post("/v1/jobs", json={**body, "distill_iters": 100_000}).json()
            wait_for_job(client, long_job["id"], lambda j: j["state"] == "distilling", 180, "distilling")
            asked = time.monotonic()
            canceled = client.post(f"/v1/jobs/{long_job['id']}/cancel")
            assert canceled.status_code == 202, canceled.text
            finished = ("canceled", "failed", "succeeded")
            job = wait_for_job(client, long_job["id"], lambda j: j["state"] in finished, 30, "cancel")
            print(f"canceled {time.monotonic() - asked:.1f} s after the request")
            assert job["state"] == "canceled" and job["finished_at"]
            messages = [e["message"] for e in job_events(client, long_job["id"])]
            assert "cancel requested" in messages and "canceled by request" in messages

            # A lost worker: SIGKILL mid-distillation, after a checkpoint was stored; a second worker
            # (its reaper) re-queues the job when the lease expires and resumes it from that checkpoint.
            resumable = {**body, "distill_iters": 600, "checkpoint_every": 20}
            job_id = client.post("/v1/jobs", json=resumable).json()["id"]
            job = wait_for_job(
                client,
                job_id,
                lambda j: j["state"] == "distilling" and distilled(j) >= 50,
                240,
                "distillation past its second checkpoint (every 20)",
            )
            # The kill comes once the worker's mirror holds a distillation checkpoint (the heartbeat
            # uploads it), so the second worker has something to resume from.
            blobs = make_blob_store(
                Settings(**{k.removeprefix("SRCOMPRESS_").lower(): v for k, v in env.items()})
            )
            stored = work_prefix(job_id) + "distilling.pt"
            wait_for(lambda: stored in blobs.list(work_prefix(job_id)), 60, "the stored checkpoint")
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed_at = job_events(client, job_id)
            state = client.get(f"/v1/jobs/{job_id}").json()["state"]
            assert state == "distilling", f"the job was {state} at the kill"
            print("killed at distill iteration", max(distill_iterations(killed_at)))

            stack.enter_context(celery_worker(worker_env, tmp_path / "worker-2.log"))
            job = wait_for_job(client, job_id, lambda j: j["state"] in finished, 300, "the rescue")
            assert job["state"] == "succeeded", job
            assert job["attempts"] == 2
            events = job_events(client, job_id)
            requeued = next(i for i, e in enumerate(events) if e["message"] == "worker lost; re-queued")
            before, after = distill_iterations(events[:requeued]), distill_iterations(events[requeued:])
            print("distill iterations before the kill:", before[-3:], "after:", after[:3], "...")
            # Resumed from a stored checkpoint (a multiple of 20 past 0), not from iteration 0, and the
            # events say so: every event of the second attempt carries attempt 2, one says where it resumed.
            assert after and after[0] > 20
            assert {e["attempt"] for e in events[:requeued]} == {1}
            assert {e["attempt"] for e in events[requeued + 1 :]} == {2}
            resumed = [e for e in events if (e["metrics"] or {}).get("resumed_from")]
            assert len(resumed) == 1 and resumed[0]["message"].startswith("resumed: attempt 2 continues at")
            point = resumed[0]["metrics"]["resumed_from"]
            assert (
                point["stage"] == "distilling"
                and point["iteration"] % 20 == 0
                and after[0] > point["iteration"]
            )
            report = client.get(f"/v1/jobs/{job_id}/report").json()
            assert report["distill"]["iterations"] == 600
            assert client.get(f"/v1/models/{job['result_model_id']}").status_code == 200
        except BaseException:
            for log in logs:
                if log.exists():
                    print(f"--- {log.name} ---\n{log.read_text()[-4000:]}")
            raise
