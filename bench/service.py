"""Service benchmark (a script, not a test) against a running stack (`srcompress serve` or scripts/stack.sh).

1. /upscale: N requests (default 200) of a 256x256 PNG through an rlfn_s x2 model from C concurrent
   clients (default 8); reports throughput, p50/p95 latency and how many got 503 (and were retried).
2. jobs (with --jobs N): first one job on the idle worker — how long from submit until it leaves
   `queued` (target <= 2 s) and from there to its first training step — then N tiny compression
   jobs submitted at once; with --kill-worker-pid the given
   worker is killed (SIGKILL) when the first job starts running and --restart-worker (a shell command)
   starts a replacement; waits until every job finished and reports how many succeeded and the wall
   time. The server needs SRCOMPRESS_MAX_RUNNING_JOBS_PER_KEY >= N and a short lease to recover fast.

    python bench/service.py --url http://127.0.0.1:8000 --key src_... [--jobs 20 --kill-worker-pid PID \
        --restart-worker "srcompress worker --pool solo"]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.models.build import create_model


def png_256(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256]
    pixels = np.clip((x + y)[..., None] / 2 + rng.normal(0, 15, (256, 256, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_rlfn_s(client: httpx.Client) -> str:
    buffer = io.BytesIO()
    torch.manual_seed(0)
    torch.save(create_model("rlfn_s", 2).state_dict(), buffer)
    response = client.post("/v1/models", files={"file": ("rlfn_s_x2.pth", buffer.getvalue())})
    response.raise_for_status()
    return response.json()["id"]


def bench_upscale(
    client: httpx.Client, model_id: str, requests: int, clients: int, tune_wait: float = 300
) -> dict:
    image = png_256()
    refused = 0

    def one(_index: int) -> tuple[float, str]:
        nonlocal refused
        began = time.perf_counter()
        while True:
            response = client.post(
                "/v1/upscale", files={"file": ("in.png", image)}, data={"model_id": model_id}
            )
            if response.status_code != 503:
                break
            refused += 1  # back-pressure: wait as the server asks, then retry
            time.sleep(float(response.headers.get("retry-after", "1")) / 4)
        response.raise_for_status()
        return time.perf_counter() - began, response.headers.get("x-srcompress-backend", "?")

    # Warm up: the first request loads the model and (upscale_backend=auto) starts measuring its
    # backends in the background; wait up to tune_wait seconds for a measured (non-eager) path so that
    # the run times the steady state. A model whose fastest exact path is eager stays eager.
    deadline = time.monotonic() + tune_wait
    while True:
        _latency, backend = one(-1)
        if backend != "eager" or time.monotonic() > deadline:
            break
        time.sleep(2)
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - began
    latencies = sorted(latency for latency, _ in results)
    return {
        "backends": dict(Counter(backend for _, backend in results)),
        "requests": requests,
        "clients": clients,
        "throughput_rps": round(requests / wall, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "refused_503_then_retried": refused,
    }


def bench_jobs(
    client: httpx.Client, model_id: str, count: int, kill_pid: int | None, restart: str | None
) -> dict:
    body = {
        "model": "rlfn_s",
        "scale": 2,
        "teacher_model_id": model_id,
        "prune_iters": 2,
        "distill_iters": 6,
        "batch_size": 2,
        "patch_size": 16,
        "validate_every": 0,
        "checkpoint_every": 2,
    }
    began = time.perf_counter()
    ids = []
    for index in range(count):
        response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"bench-{began}-{index}"})
        response.raise_for_status()
        ids.append(response.json()["id"])
    killed = False
    replacement = None
    while True:
        states = [client.get(f"/v1/jobs/{job_id}").json()["state"] for job_id in ids]
        if (
            kill_pid
            and not killed
            and any(s not in ("queued", "succeeded", "failed", "canceled") for s in states)
        ):
            os.kill(kill_pid, signal.SIGKILL)
            killed = True
            if restart:
                replacement = subprocess.Popen(restart, shell=True, executable="/bin/bash")
        if all(s in ("succeeded", "failed", "canceled") for s in states):
            break
        time.sleep(2)
    if replacement is not None:
        replacement.terminate()
    return {
        "jobs": count,
        "succeeded": states.count("succeeded"),
        "failed": states.count("failed"),
        "worker_killed": killed,
        "wall_s": round(time.perf_counter() - began, 1),
    }


def bench_job_start(client: httpx.Client, model_id: str) -> dict:
    """One job on an idle worker: submit -> it leaves `queued`, and from there -> its first training
    step (the first progress event with an iteration), from the job's own event timestamps."""
    body = {"model": "rlfn_s", "scale": 2, "teacher_model_id": model_id, "prune_iters": 2,
            "distill_iters": 2, "batch_size": 2, "patch_size": 16}  # fmt: skip
    job = client.post("/v1/jobs", json=body).json()
    while client.get(f"/v1/jobs/{job['id']}").json()["state"] not in ("succeeded", "failed", "canceled"):
        time.sleep(1)
    events = [
        json.loads(line[6:])
        for line in client.get(f"/v1/jobs/{job['id']}/events", params={"follow": "false"}).text.splitlines()
        if line.startswith("data: {") and '"seq"' in line
    ]
    at = {name: datetime.fromisoformat(e["created_at"]) for name, e in _firsts(events).items()}
    return {
        "submit_to_leaving_queued_s": round((at["left_queued"] - at["created"]).total_seconds(), 2),
        "leaving_queued_to_first_step_s": round((at["first_step"] - at["left_queued"]).total_seconds(), 2),
    }


def _firsts(events: list[dict]) -> dict[str, dict]:
    return {
        "created": events[0],
        "left_queued": next(e for e in events if e["state"] != "queued"),
        "first_step": next(e for e in events if "iteration" in (e["metrics"] or {})),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument(
        "--tune-wait",
        type=float,
        default=300,
        help="seconds to wait for the measured backend before timing (0 with a fixed upscale_backend)",
    )
    parser.add_argument("--kill-worker-pid", type=int)
    parser.add_argument("--restart-worker", help="shell command starting a replacement worker")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"}
    with httpx.Client(base_url=args.url, headers=headers, timeout=300) as client:
        model_id = upload_rlfn_s(client)
        print(
            "upscale:",
            bench_upscale(client, model_id, args.requests, args.clients, args.tune_wait),
            flush=True,
        )
        if args.jobs:
            print("job start on an idle worker:", bench_job_start(client, model_id), flush=True)
            print("jobs:", bench_jobs(client, model_id, args.jobs, args.kill_worker_pid, args.restart_worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
