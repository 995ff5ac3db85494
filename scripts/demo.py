"""The main job, as a user does it over HTTP against a running srcompress API.

    python scripts/demo.py --url http://127.0.0.1:8765 --key KEY --out runs/demo

Uploads the teacher (the real RLFN-S ×2 from ../shared/weights, else one trained briefly on the
bundled sample images) and, when ../shared is there, a training set (T91, 53 images) and Set5 as a
validation set that is reported only. Submits a compression job with a size budget of 45K parameters
and a time budget of a few minutes (the `fast` recipe: the checkpoint is chosen on training images held
out from training), follows its progress events, prints the student's gap to the teacher and to
bicubic per validation set, downloads the compact model and upscales an image with it.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_TEACHER = SHARED / "weights" / "RLFN_s_x2.pth"
SHARED_TRAIN = SHARED / "data" / "train" / "T91_partial53"
SHARED_VAL = SHARED / "data" / "benchmark" / "Set5" / "HR"


def teacher_checkpoint(out: Path) -> Path:
    if SHARED_TEACHER.exists():
        return SHARED_TEACHER
    from core.data.sample import sample_dir

    print("../shared/weights is absent: training a small rlfn_s teacher on the sample images first")
    sample = sample_dir(out / "cache")
    teacher = out / "teacher"
    cmd = [sys.executable, "-m", "srcompress", "train", "rlfn_s", "--scale", "2", "--train", str(sample),
           "--val", str(sample), "--iters", "150", "--batch-size", "8",
           "--out", str(teacher), "--resume"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return teacher / "model" / "model.safetensors"


def check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        request = response.request
        sys.exit(f"demo: {request.method} {request.url} -> {response.status_code} {response.text}")
    return response


def upload_folder(client: httpx.Client, folder: Path, name: str, kind: str) -> str:
    """Zip a folder of images in memory and upload it as a dataset; returns its id."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    files = {"file": (f"{name}.zip", buffer.getvalue(), "application/zip")}
    dataset = check(client.post("/v1/datasets", files=files, data={"name": name, "kind": kind})).json()
    print(f"   dataset {dataset['id']}: {name}, {dataset['image_count']} images ({kind})")
    return dataset["id"]


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
                k: v
                for k, v in metrics.items()
                if k in ("density", "params", "student", "val_psnr", "eta_s", "phase")
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
    parser.add_argument(
        "--minutes", type=float, default=4.0, help="the job's budget for pruning, labelling and distillation"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    client = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.key}"}, timeout=120)

    teacher = teacher_checkpoint(args.out)
    print(f"1. upload the teacher {teacher.name}")
    with teacher.open("rb") as handle:
        model = check(client.post("/v1/models", files={"file": (teacher.name, handle)},
                                  data={"name": "rlfn_s x2 teacher"})).json()  # fmt: skip
    print(f"   model {model['id']}: {model['family']} x{model['scale']}, {model['params']:,} params")

    if SHARED_TRAIN.is_dir() and SHARED_VAL.is_dir():
        print("2. upload a training set and a validation set (reported only, never trained or chosen on)")
        train_ids = [upload_folder(client, SHARED_TRAIN, "T91_partial53", "train")]
        val_ids = [upload_folder(client, SHARED_VAL, "Set5", "eval")]
    else:
        print("2. ../shared/data is absent: train and report on the bundled `sample` images")
        train_ids, val_ids = ["sample"], ["sample"]

    print(
        f"3. submit a compression job: at most 45,000 params, {args.minutes:g} minutes, the fast recipe, "
        "exported as fp32 and int8 ONNX"
    )
    job_request = {
        "model": "rlfn_s",
        "scale": 2,
        "teacher_model_id": model["id"],
        "train_dataset_ids": train_ids,
        "val_dataset_ids": val_ids,
        "target_params": 45_000,
        "budget_minutes": args.minutes,
        "formats": ["onnx", "onnx_int8"],
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
    recipe, distill = report["recipe"], report["distill"]
    print(
        f"   done: student {s['params']:,} params ({s['params'] / t['params']:.1%} of the teacher), recipe "
        f"{recipe['name']}, {distill['iterations']:,} iterations in {distill['seconds']:.0f} s"
    )
    for gap in report["gaps"]:
        role = (
            "held out from training, chose the checkpoint" if gap["used_for_selection"] else "reported only"
        )
        print(
            f"   {gap['dataset']:<8} bicubic {gap['bicubic']:.2f}  teacher {gap['teacher']:.2f}  "
            f"student {gap['student']:.2f} dB  (student − teacher {gap['student_minus_teacher']:+.2f}, "
            f"− bicubic {gap['student_minus_bicubic']:+.2f})  [{role}]"
        )

    for f in (report.get("quantize") or {}).get("formats", []):
        figures = (
            f"parity {f['parity_db']:.1f} dB, costs {f['quality_cost_db']:+.3f} dB PSNR-Y, "
            f"{f['latency_ms']:.0f} ms at LR 640x360, {f['bytes']:,} bytes"
            if f["ok"]
            else f"not offered: {f['reason']}"
        )
        print(f"   format {f['name']:<10} {figures}")

    print("4. download the compact model (every file, every format)")
    model_dir = args.out / "compact_model"
    model_dir.mkdir(exist_ok=True)
    for link in check(client.get(f"/v1/models/{job['result_model_id']}/download")).json():
        url = link["url"] if link["url"].startswith("http") else args.url + link["url"]
        data = check(client.get(url, follow_redirects=True)).content
        (model_dir / link["name"]).write_bytes(data)
        print(f"   {model_dir / link['name']} ({len(data):,} bytes)")

    print("5. upscale an image with it, in fp32 and on the int8 path")
    from core.data.sample import sample_dir

    image = sorted(sample_dir(args.out / "cache").glob("*.png"))[0]
    for precision in ("fp32", "int8"):
        form = {"model_id": job["result_model_id"], "precision": precision}
        with image.open("rb") as handle:
            files = {"file": (image.name, handle, "image/png")}
            response = check(client.post("/v1/upscale", files=files, data=form))
        result = args.out / f"{image.stem}_x2_{precision}.png"
        result.write_bytes(response.content)
        served = f"{response.headers['X-Srcompress-Backend']} ({response.headers['X-Srcompress-Precision']})"
        print(f"   {result}  served by {served}")


if __name__ == "__main__":
    main()
