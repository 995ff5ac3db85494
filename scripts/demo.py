"""The main job, as a user does it over HTTP against a running srcompress API.

    python scripts/demo.py --url http://127.0.0.1:8765 --key KEY --out runs/demo

Uploads the teacher (the real RLFN-S ×2 from ../shared/weights, else one trained briefly on the
bundled sample images), submits a compression job on the always-present `sample` dataset with a size
budget of 45K parameters, follows its progress events, downloads the compact model and upscales an
image with it. Small iteration counts: every stage runs in minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED_TEACHER = REPO.parent / "shared" / "weights" / "RLFN_s_x2.pth"


def teacher_checkpoint(out: Path) -> Path:
    if SHARED_TEACHER.exists():
        return SHARED_TEACHER
    from core.data.sample import sample_dir

    print("../shared/weights is absent: training a small rlfn_s teacher on the sample images first")
    sample = sample_dir(out / "cache")
    teacher = out / "teacher"
    cmd = [sys.executable, "-m", "core.cli", "train", "rlfn_s", "--scale", "2", "--train", str(sample),
           "--val", str(sample), "--iters", "150", "--batch-size", "8",
           "--out", str(teacher), "--resume"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return teacher / "model" / "model.safetensors"


def check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        request = response.request
        sys.exit(f"demo: {request.method} {request.url} -> {response.status_code} {response.text}")
    return response


def follow_events(client: httpx.Client, job_id: str) -> None:
    """Print the job's server-sent events until it ends."""
    last_stage = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: end"):
                return
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            stage = event.get("state") or event.get("stage")
            metrics = event.get("metrics") or {}
            shown = {
                k: v for k, v in metrics.items() if k in ("density", "params", "student", "val_psnr", "total")
            }
            if stage != last_stage or shown:
                fraction = event.get("fraction")
                progress = f"{fraction:5.0%}" if isinstance(fraction, float) else "     "
                print(f"  {stage:<12}{progress}  {json.dumps(shown) if shown else ''}", flush=True)
            last_stage = stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--distill-iters", type=int, default=300)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    client = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.key}"}, timeout=120)

    teacher = teacher_checkpoint(args.out)
    print(f"1. upload the teacher {teacher.name}")
    with teacher.open("rb") as handle:
        model = check(client.post("/v1/models", files={"file": (teacher.name, handle)},
                                  data={"name": "rlfn_s x2 teacher"})).json()  # fmt: skip
    print(f"   model {model['id']}: {model['family']} x{model['scale']}, {model['params']:,} params")

    print("2. submit a compression job on the bundled `sample` dataset (budget 45,000 params)")
    job_request = {
        "model": "rlfn_s",
        "scale": 2,
        "teacher_model_id": model["id"],
        "train_dataset_ids": ["sample"],
        "val_dataset_ids": ["sample"],
        "target_params": 45_000,
        "prune_iters": 20,
        "distill_iters": args.distill_iters,
        # A few hundred iterations: start from the teacher's weights and use a larger lr than the
        # paper's 1e-4 (meant for 800k iterations), so that the demo's student is already usable.
        "student_init": "inherit",
        "distill_lr": 2e-3,
        "batch_size": 8,
        "validate_every": 100,
    }
    job = check(
        client.post("/v1/jobs", json=job_request, headers={"Idempotency-Key": f"demo-{time.time()}"})
    ).json()
    print(f"   job {job['id']} is {job['state']}; following its events:")
    follow_events(client, job["id"])
    job = check(client.get(f"/v1/jobs/{job['id']}")).json()
    if job["state"] != "succeeded":
        sys.exit(f"demo: the job ended {job['state']}: {job['error']}")

    report = check(client.get(f"/v1/jobs/{job['id']}/report")).json()
    t, s = report["teacher"], report["student"]
    print(f"3. done: student {s['params']:,} params ({s['params'] / t['params']:.1%} of the teacher)")
    for bt, tt, st in zip(report["bicubic"], t["scores"], s["scores"], strict=True):
        psnrs = f"bicubic {bt['psnr']:.2f}  teacher {tt['psnr']:.2f}  student {st['psnr']:.2f} dB"
        print(f"   {st['dataset']}: {psnrs}")

    print("4. download the compact model")
    model_dir = args.out / "compact_model"
    model_dir.mkdir(exist_ok=True)
    for link in check(client.get(f"/v1/models/{job['result_model_id']}/download")).json():
        url = link["url"] if link["url"].startswith("http") else args.url + link["url"]
        data = check(client.get(url, follow_redirects=True)).content
        (model_dir / link["name"]).write_bytes(data)
        print(f"   {model_dir / link['name']} ({len(data):,} bytes)")

    print("5. upscale an image with it")
    from core.data.sample import sample_dir

    image = sorted(sample_dir(args.out / "cache").glob("*.png"))[0]
    with image.open("rb") as handle:
        response = check(client.post("/v1/upscale", files={"file": (image.name, handle, "image/png")},
                                     data={"model_id": job["result_model_id"]}))  # fmt: skip
    result = args.out / f"{image.stem}_x2.png"
    result.write_bytes(response.content)
    print(f"   {result}")


if __name__ == "__main__":
    main()
