"""The API over HTTP: a real uvicorn process on Postgres + Redis (broker) + moto S3 (over HTTP).

No worker runs here, so jobs stay queued; tests/test_lifecycle.py runs them. Every bad input must
answer a clear 4xx in the one error shape, and nothing stored before it may be lost.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import cv2
import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from core.complexity import count_params
from core.models.build import create_model
from store.db import migrate
from tests.service_helpers import (
    create_key,
    parse_sse,
    png_bytes,
    tar_bytes,
    unavailable,
    uvicorn_server,
    wait_for,
    zip_bytes,
)
from tests.stores import free_port, moto_s3_server, postgres_unavailable_reason, throwaway_postgres_database

pytestmark = [pytest.mark.service, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/13"  # a database of its own: the test flushes it
MAX_UPLOAD = 2 * 1024 * 1024
MAX_PIXELS = 300 * 300


def _redis_or_skip() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as error:
        unavailable(f"Redis at {REDIS_URL} unreachable: {error}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(base_url, key_a, key_b, env) of an API on Postgres + Redis + moto S3."""
    reason = postgres_unavailable_reason()
    if reason:
        unavailable(reason)
    _redis_or_skip()
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    tmp = tmp_path_factory.mktemp("api")
    with throwaway_postgres_database() as database_url, moto_s3_server() as s3_url:
        migrate(database_url)
        env = {
            "SRCOMPRESS_DATA_DIR": str(tmp / "data"),
            "SRCOMPRESS_DATABASE_URL": database_url,
            "SRCOMPRESS_BROKER_URL": REDIS_URL,
            "SRCOMPRESS_BLOB_BACKEND": "s3",
            "SRCOMPRESS_S3_ENDPOINT_URL": s3_url,
            "SRCOMPRESS_S3_BUCKET": "srcompress-api-test",
            "SRCOMPRESS_S3_ACCESS_KEY": "testing",
            "SRCOMPRESS_S3_SECRET_KEY": "testing",
            "SRCOMPRESS_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "SRCOMPRESS_MAX_PIXELS": str(MAX_PIXELS),
            "SRCOMPRESS_UPSCALE_CONCURRENCY": "1",
            "SRCOMPRESS_UPSCALE_QUEUE": "1",
            "SRCOMPRESS_MAX_RUNNING_JOBS_PER_KEY": "2",
            "TMPDIR": str(tmp / "spool"),  # where the server spools request bodies (checked to stay empty)
        }
        (tmp / "spool").mkdir()
        key_a, key_b = create_key(env, "alice"), create_key(env, "bob")
        with uvicorn_server(env, free_port(), tmp / "uvicorn.log") as url:
            yield url, key_a, key_b, env
    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture(scope="module")
def alice(stack):
    url, key_a, _, _ = stack
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key_a}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def bob(stack):
    url, _, key_b, _ = stack
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key_b}"}, timeout=120) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
    assert body["error"]["message"] and "\n" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def state_dict_bytes(preset: str, scale: int, seed: int = 0) -> tuple[bytes, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    state = create_model(preset, scale).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


@pytest.fixture(scope="module")
def rlfn_model(alice) -> tuple[dict, dict[str, torch.Tensor]]:
    """alice's rlfn_s x2 upload and the state_dict it came from."""
    data, state = state_dict_bytes("rlfn_s", 2)
    response = alice.post("/v1/models", files={"file": ("rlfn_s_x2.pth", data)}, data={"name": "teacher"})
    assert response.status_code == 201, response.text
    return response.json(), state


# --- health, auth, docs -------------------------------------------------------------------------------


def test_health_ready_metrics(stack):
    url = stack[0]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    assert {name for name, check in ready.json()["checks"].items() if check["ok"]} == {
        "database",
        "broker",
        "storage",
    }
    metrics = httpx.get(f"{url}/metrics").text
    assert 'srcompress_jobs{state="queued"}' in metrics
    assert "srcompress_upscale_queue_depth" in metrics
    assert "srcompress_http_requests_total" in metrics


def test_auth_required_and_one_error_shape(stack):
    url = stack[0]
    assert_error(httpx.get(f"{url}/v1/models"), 401, "unauthorized")
    assert_error(
        httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer src_nope_nope"}), 401, "unauthorized"
    )
    assert_error(httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Basic abc"}), 401)
    assert_error(httpx.get(f"{url}/v1/no-such-route"), 404, "not_found")
    openapi = httpx.get(f"{url}/openapi.json").json()
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}/events",
        "/v1/models",
        "/v1/datasets",
        "/v1/upscale",
        "/readyz",
    ):
        assert path in openapi["paths"], path


def test_presets_list_params_and_macs(alice):
    response = alice.get("/v1/presets", params={"name": "rlfn_s", "scale": 2})
    assert response.status_code == 200, response.text
    (row,) = response.json()
    assert row["params"] == count_params(create_model("rlfn_s", 2)).total
    assert row["lr_size"] == [640, 360] and row["macs"] > 0 and row["family"] == "rlfn"
    print(f"rlfn_s x2: {row['params']:,} params, {row['gmacs']} GMACs at 640x360")
    assert_error(alice.get("/v1/presets", params={"name": "nope"}), 422)


# --- models -------------------------------------------------------------------------------------------


def test_model_upload_show_download_roundtrip(alice, rlfn_model):
    model, state = rlfn_model
    assert model["family"] == "rlfn" and model["scale"] == 2 and model["source"] == "upload"
    assert model["params"] == sum(t.numel() for t in state.values())
    assert {"model.safetensors", "config.json"} <= set(model["files"])
    assert alice.get(f"/v1/models/{model['id']}").json()["id"] == model["id"]
    assert model["id"] in [m["id"] for m in alice.get("/v1/models").json()["items"]]

    links = {link["name"]: link for link in alice.get(f"/v1/models/{model['id']}/download").json()}
    weights_url = links["model.safetensors"]["url"]
    assert (
        weights_url.startswith("http") and "Signature" in weights_url
    )  # presigned S3 URL, no API key needed
    downloaded = load_safetensors(httpx.get(weights_url).content)
    assert set(downloaded) == set(state)
    assert all(torch.equal(downloaded[k], state[k]) for k in state)
    config = json.loads(httpx.get(links["config.json"]["url"]).content)
    assert config["family"] == "rlfn" and config["scale"] == 2 and config["channels"] == 48

    redirect = alice.get(f"/v1/models/{model['id']}/files/model.safetensors")
    assert redirect.status_code == 307 and redirect.headers["location"].startswith("http")
    streamed = alice.get(f"/v1/models/{model['id']}/files/config.json", params={"redirect": "false"})
    assert streamed.status_code == 200 and json.loads(streamed.content) == config


class _Exploit:
    """A pickle that would create a file if it were ever unpickled with code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_checkpoints_are_refused_and_nothing_is_lost(alice, bob, rlfn_model, tmp_path):
    model, state = rlfn_model
    before = alice.get("/v1/models").json()["total"]

    edsr, _ = state_dict_bytes("edsr_mini", 2)
    error = assert_error(
        alice.post("/v1/models", files={"file": ("x.pth", edsr)}, data={"family": "rlfn"}),
        422,
        "invalid_checkpoint",
    )
    assert "edsr" in error["message"]
    assert_error(alice.post("/v1/models", files={"file": ("x.pth", edsr)}, data={"preset": "rlfn_s"}), 422)
    assert_error(alice.post("/v1/models", files={"file": ("x.pth", edsr)}, data={"scale": "4"}), 422)

    marker = tmp_path / "pwned"
    payload = pickle.dumps({"params": {"conv_1.weight": _Exploit(marker)}})
    error = assert_error(
        alice.post("/v1/models", files={"file": ("evil.pth", payload)}), 422, "invalid_checkpoint"
    )
    assert "code" in error["message"] or "unpickle" in error["message"]
    assert not marker.exists(), "the pickle's payload ran"

    assert_error(alice.post("/v1/models", files={"file": ("junk.pth", b"not a checkpoint")}), 422)
    assert_error(alice.post("/v1/models", files={"file": ("junk.safetensors", b"\x00" * 64)}), 422)
    assert_error(alice.post("/v1/models", files={"file": ("empty.pth", b"")}), 422)
    assert_error(alice.post("/v1/models", files={"file": ("big.pth", b"\x00" * (MAX_UPLOAD + 1))}), 413)
    assert_error(alice.post("/v1/models", data={"name": "no file"}), 422, "invalid_request")

    # Other keys' ids answer 404 everywhere, exactly like unknown ids.
    for call in (bob.get, bob.delete):
        assert_error(call(f"/v1/models/{model['id']}"), 404, "not_found")
    assert_error(bob.get(f"/v1/models/{model['id']}/download"), 404)
    assert_error(alice.get("/v1/models/00000000-0000-0000-0000-000000000000"), 404)

    assert alice.get("/v1/models").json()["total"] == before
    links = {link["name"]: link["url"] for link in alice.get(f"/v1/models/{model['id']}/download").json()}
    assert torch.equal(
        load_safetensors(httpx.get(links["model.safetensors"]).content)["conv_1.weight"],
        state["conv_1.weight"],
    )


def test_safetensors_upload_detects_config(alice):
    from safetensors.torch import save

    state = create_model("edsr_mini", 3).state_dict()
    response = alice.post("/v1/models", files={"file": ("mini.safetensors", save(state))})
    assert response.status_code == 201, response.text
    assert response.json()["family"] == "edsr" and response.json()["scale"] == 3
    assert alice.delete(f"/v1/models/{response.json()['id']}").status_code == 204
    assert_error(alice.get(f"/v1/models/{response.json()['id']}"), 404)


# --- datasets -----------------------------------------------------------------------------------------


def test_dataset_upload_list_and_archive_safety(alice, bob):
    listed = alice.get("/v1/datasets").json()["items"]
    assert "sample" in [d["id"] for d in listed]
    assert_error(alice.delete("/v1/datasets/sample"), 409, "builtin")

    images = {f"imgs/{i}.png": png_bytes(48, 48, seed=i) for i in range(3)}
    good = alice.post("/v1/datasets", files={"file": ("set.zip", zip_bytes(images))}, data={"name": "set"})
    assert good.status_code == 201, good.text
    dataset = good.json()
    assert dataset["image_count"] == 3 and not dataset["builtin"]
    good_tar = alice.post("/v1/datasets", files={"file": ("set.tar.gz", tar_bytes(images))})
    assert good_tar.status_code == 201 and good_tar.json()["image_count"] == 3
    before = alice.get("/v1/datasets").json()["total"]

    image = png_bytes(32, 32)
    bad_archives = {
        "dotdot.tar.gz": (tar_bytes({"../evil.png": image}), "unsafe_archive"),
        "absolute.zip": (zip_bytes({"/etc/evil.png": image}), "unsafe_archive"),
        "dotdot.zip": (zip_bytes({"a/../../evil.png": image}), "unsafe_archive"),
        "symlink.tar.gz": (tar_bytes({"a.png": image}, {"b.png": ("sym", "/etc/passwd")}), "unsafe_archive"),
        "hardlink.tar.gz": (tar_bytes({"a.png": image}, {"b.png": ("hard", "a.png")}), "unsafe_archive"),
        "corrupt.zip": (zip_bytes({"a.png": image, "b.png": image[:40]}), "invalid_image"),
        "not_image.zip": (zip_bytes({"a.png": image, "notes.txt": b"hello"}), "not_an_image"),
        "fake.zip": (zip_bytes({"a.png": b"plain text, not a png"}), "invalid_image"),
        "empty.zip": (zip_bytes({}), "no_images"),
        "not_archive.zip": (b"this is not an archive at all", "invalid_archive"),
    }
    for name, (data, code) in bad_archives.items():
        error = assert_error(alice.post("/v1/datasets", files={"file": (name, data)}), 422, code)
        print(f"{name}: {error['message']}")
    assert_error(alice.post("/v1/datasets", files={"file": ("big.zip", b"\x00" * (MAX_UPLOAD + 10))}), 413)
    # Too many pixels is one status and code wherever it is met, naming the service's limit (also for an
    # image past Pillow's own decompression-bomb guard, whose limit used to be quoted with a 422).
    for image in (png_bytes(400, 400), png_header_only(15000, 15000)):
        upload = {"file": ("huge.zip", zip_bytes({"a.png": image}))}
        error = assert_error(alice.post("/v1/datasets", files=upload), 413, "image_too_large")
        assert f"{MAX_PIXELS:,}-pixel limit" in error["message"]

    assert alice.get("/v1/datasets").json()["total"] == before
    assert_error(bob.get(f"/v1/datasets/{dataset['id']}"), 404)
    assert_error(bob.delete(f"/v1/datasets/{dataset['id']}"), 404)
    assert dataset["id"] not in [d["id"] for d in bob.get("/v1/datasets").json()["items"]]
    assert alice.get(f"/v1/datasets/{dataset['id']}").json()["image_count"] == 3
    assert alice.delete(f"/v1/datasets/{good_tar.json()['id']}").status_code == 204
    assert_error(alice.get(f"/v1/datasets/{good_tar.json()['id']}"), 404)


# --- upscale ------------------------------------------------------------------------------------------


def server_process(url: str) -> psutil.Process:
    """The uvicorn process serving `url` (a child of this test run)."""
    port = url.rsplit(":", 1)[1]
    for child in psutil.Process().children(recursive=True):
        if "uvicorn" in " ".join(child.cmdline()) and port in child.cmdline():
            return child
    raise AssertionError(f"no uvicorn process serves {url}")


def peak_rss_growth(process: psutil.Process, work) -> tuple[int, object]:
    """(peak RSS during `work()` minus RSS before it, work's result), RSS sampled every 2 ms."""
    before = process.memory_info().rss
    peak, done = before, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return peak - before, result


def zip_bomb(member_bytes: int) -> bytes:
    """A small zip holding one image-named member of `member_bytes` zeros."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("bomb.png", "w") as member:
            chunk = bytes(1 << 20)
            for _ in range(member_bytes >> 20):
                member.write(chunk)
    return buffer.getvalue()


def lying_zip(real_bytes: int, declared: int) -> bytes:
    """A zip whose headers say its member holds `declared` bytes while `real_bytes` are stored."""
    data = bytearray(zip_bomb(real_bytes))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        size_field = data.index(signature) + offset
        data[size_field : size_field + 4] = struct.pack("<I", declared)
    return bytes(data)


def test_archive_bombs_and_chunked_uploads_keep_memory_and_disk_flat(stack, alice):
    """A 300 MiB member in a small zip and a zip whose header lies about its size are refused with the
    API's memory growing less than 100 MB; a chunked over-limit body is cut off with 413."""
    url, _, _, env = stack
    process = server_process(url)
    before = alice.get("/v1/datasets").json()["total"]
    bomb = zip_bomb(300 << 20)
    assert len(bomb) < MAX_UPLOAD
    growth, response = peak_rss_growth(
        process, lambda: alice.post("/v1/datasets", files={"file": ("b.zip", bomb)})
    )
    error = assert_error(response, 413)
    print(f"zip bomb ({len(bomb):,} bytes): {error['code']}, API RSS +{growth / 2**20:.1f} MiB")
    assert growth < 100 * 2**20
    liar = lying_zip(300 << 20, declared=1000)
    growth, response = peak_rss_growth(
        process, lambda: alice.post("/v1/datasets", files={"file": ("l.zip", liar)})
    )
    assert_error(response, 422, "invalid_archive")
    print(f"lying zip: API RSS +{growth / 2**20:.1f} MiB")
    assert growth < 100 * 2**20
    assert alice.get("/v1/datasets").json()["total"] == before

    def chunks():  # no Content-Length: the server learns the size only as the bytes arrive
        for _ in range(MAX_UPLOAD // (256 << 10) + 8):
            yield bytes(256 << 10)

    boundary = "fuzzboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.pth"\r\n\r\n'.encode()

    def body():
        yield head
        yield from chunks()

    spool = Path(env["TMPDIR"])
    listed_before = sorted(spool.iterdir())
    response = alice.post(
        "/v1/models", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_error(response, 413, "payload_too_large")
    assert sorted(spool.iterdir()) == listed_before
    assert alice.get("/v1/models").status_code == 200  # the server is fine afterwards


def test_upscale_formats_and_limits(alice, bob, rlfn_model):
    model_id = rlfn_model[0]["id"]
    response = alice.post(
        "/v1/upscale", files={"file": ("a.png", png_bytes(40, 24))}, data={"model_id": model_id}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (80, 48)

    rgba = alice.post(
        "/v1/upscale", files={"file": ("a.png", png_bytes(20, 20, mode="RGBA"))}, data={"model_id": model_id}
    )
    assert rgba.status_code == 200 and Image.open(io.BytesIO(rgba.content)).mode == "RGBA"
    jpg = alice.post(
        "/v1/upscale",
        files={"file": ("a.png", png_bytes(20, 20))},
        data={"model_id": model_id, "format": "jpg"},
    )
    assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg"
    tiled = alice.post(
        "/v1/upscale", files={"file": ("a.png", png_bytes(80, 72))}, data={"model_id": model_id, "tile": "32"}
    )
    assert tiled.status_code == 200 and Image.open(io.BytesIO(tiled.content)).size == (160, 144)

    files = {"file": ("a.png", png_bytes(16, 16))}
    assert_error(
        alice.post("/v1/upscale", files={"file": ("a.png", b"garbage")}, data={"model_id": model_id}), 422
    )
    for image in (png_bytes(400, 300), png_header_only(15000, 15000)):
        error = assert_error(
            alice.post("/v1/upscale", files={"file": ("a.png", image)}, data={"model_id": model_id}),
            413,
            "image_too_large",
        )
        assert f"{MAX_PIXELS:,}-pixel limit" in error["message"]
    assert_error(
        alice.post(
            "/v1/upscale", files={"file": ("a.png", b"\x00" * (MAX_UPLOAD + 1))}, data={"model_id": model_id}
        ),
        413,
    )
    assert_error(alice.post("/v1/upscale", files=files, data={"model_id": "nope"}), 404)
    assert_error(bob.post("/v1/upscale", files=files, data={"model_id": model_id}), 404)
    assert_error(alice.post("/v1/upscale", files=files, data={"model_id": model_id, "format": "gif"}), 422)
    assert_error(alice.post("/v1/upscale", files=files, data={"model_id": model_id, "preset": "edsr"}), 422)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height in its header and holds no pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def png16_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A 16-bit RGB PNG of smooth content with every 16-bit level in use (cv2 writes BGR order)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = ((x + y) * 65535 / max(width + height - 2, 1))[..., None]
    pixels = np.clip(base + rng.normal(0, 3000, (height, width, 3)), 0, 65535).astype(np.uint16)
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    return encoded.tobytes()


def test_16bit_images_are_served_in_16bit_precision_on_a_reduced_precision_path(stack, alice, rlfn_model):
    """A server whose models run in bf16 (as the tuner picks on CPUs with native bf16) serves 8-bit
    images in bf16 but 16-bit images on an exact fp32 path: within 2/65535 of the fp32 output."""
    model_id = rlfn_model[0]["id"]
    image16 = {"file": ("deep.png", png16_bytes(40, 32))}
    fp32 = alice.post("/v1/upscale", files=image16, data={"model_id": model_id})
    assert fp32.status_code == 200, fp32.text
    assert fp32.headers["X-Srcompress-Backend"] not in ("bf16", "fp16")
    url, key_a, _, env = stack
    bf16_env = {**env, "SRCOMPRESS_UPSCALE_BACKEND": "bf16"}
    with uvicorn_server(bf16_env, free_port(), Path(env["SRCOMPRESS_DATA_DIR"]) / "bf16.log") as bf16_url:
        with httpx.Client(base_url=bf16_url, headers={"Authorization": f"Bearer {key_a}"}, timeout=120) as c:
            eight = c.post(
                "/v1/upscale", files={"file": ("a.png", png_bytes(40, 32))}, data={"model_id": model_id}
            )
            assert eight.headers["X-Srcompress-Backend"] == "bf16"
            served = c.post("/v1/upscale", files=image16, data={"model_id": model_id})
    assert served.status_code == 200 and served.headers["X-Srcompress-Backend"] == "eager"
    decode = lambda body: cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)  # noqa: E731
    a, b = decode(fp32.content), decode(served.content)
    assert a.dtype == b.dtype == np.uint16 and a.shape == b.shape == (64, 80, 3)
    assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= 2
    assert len(np.unique(b[..., 0])) > 256  # more levels than any 8-bit image has


def test_upscale_full_queue_answers_503(alice, rlfn_model):
    """concurrency 1 + queue 1: of 8 simultaneous requests some must be refused at once, not piled up."""
    model_id = rlfn_model[0]["id"]
    image = png_bytes(256, 256)
    statuses: list[tuple[int, str | None]] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()
        response = alice.post("/v1/upscale", files={"file": ("a.png", image)}, data={"model_id": model_id})
        statuses.append((response.status_code, response.headers.get("retry-after")))
        if response.status_code == 503:
            assert_error(response, 503, "busy")

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(code for code, _ in statuses)
    print("statuses:", codes)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
    assert all(retry is not None for code, retry in statuses if code == 503)


def test_upscale_switches_to_the_measured_fastest_backend(stack, alice, rlfn_model):
    """upscale_backend=auto (the default): the first request is served eagerly at once while the API
    measures the model's backends in the background; once the decision is on disk, requests use it."""
    from core.infer.runners import BACKENDS

    model_id = rlfn_model[0]["id"]
    image = {"file": ("a.png", png_bytes(32, 32))}
    first = alice.post("/v1/upscale", files=image, data={"model_id": model_id})
    assert first.status_code == 200 and first.headers["x-srcompress-backend"] in BACKENDS

    decisions_dir = Path(stack[3]["SRCOMPRESS_DATA_DIR"]) / "cache" / "backend"
    decisions = wait_for(lambda: sorted(decisions_dir.glob("*.json")), 600, "the backend decision")
    assert len(decisions) == 1, decisions  # one model was upscaled, so one decision
    decision = json.loads(decisions[0].read_text())
    trials = [(trial["backend"], round(trial["speedup"], 2)) for trial in decision["trials"]]
    print("decision:", decision["backend"], trials)
    assert decision["family"] == "rlfn"

    def served_backend() -> str | None:
        response = alice.post("/v1/upscale", files=image, data={"model_id": model_id})
        assert response.status_code == 200, response.text
        backend = response.headers["x-srcompress-backend"]
        return backend if backend == decision["backend"] else None

    wait_for(served_backend, 30, f"requests served with {decision['backend']}")


# --- jobs ---------------------------------------------------------------------------------------------


def job_body(teacher_id: str, **overrides) -> dict:
    body = {
        "model": "rlfn_s",
        "scale": 2,
        "teacher_model_id": teacher_id,
        "prune_iters": 2,
        "distill_iters": 4,
        "batch_size": 2,
        "patch_size": 16,
    }
    return {**body, **overrides}


def test_jobs_validation_idempotency_limits_cancel_and_events(stack, alice, bob, rlfn_model):
    teacher = rlfn_model[0]["id"]
    # Bad input: malformed JSON, out-of-range λ/α, unknown fields, unknown or foreign ids, mismatched teacher.
    bad = alice.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(bad, 422, "invalid_request")
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, **{"lambda": -1})), 422)
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, alpha=-0.5)), 422)
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, patch_size=20)), 422)
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, scale=5)), 422)
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, bogus=1)), 422)
    # A budget and iteration counts together, a student preset with a size target, unknown recipes,
    # non-finite numbers (the JSON extension Infinity, and 1e309) are refused at submit.
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, budget_minutes=5)), 422, "invalid_request")
    preset_and_target = job_body(teacher, student_preset="edsr_mini", target_params=45000)
    assert_error(alice.post("/v1/jobs", json=preset_and_target), 422)
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, recipe="slow")), 422)
    for number in (b'"alpha": Infinity', b'"distill_lr": 1e309', b'"target_gmacs": NaN'):
        raw = b'{"model": "rlfn_s", "scale": 2, "teacher_model_id": "%s", %s}' % (teacher.encode(), number)
        assert_error(alice.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"}), 422)
    assert_error(
        alice.post("/v1/jobs", json=job_body(teacher, model="edsr_baseline")), 422, "teacher_mismatch"
    )
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, scale=4)), 422, "teacher_mismatch")
    assert_error(alice.post("/v1/jobs", json=job_body("no-such-model")), 404)
    assert_error(bob.post("/v1/jobs", json=job_body(teacher)), 404)
    assert_error(alice.post("/v1/jobs", json=job_body(teacher, train_dataset_ids=["nope"])), 404)
    assert alice.get("/v1/jobs").json()["total"] == 0

    # Idempotency: same key + body → same job; a different body → 422.
    body = job_body(teacher, **{"lambda": 1e-4})
    first = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    job = first.json()
    assert job["state"] == "queued" and job["config"]["lambda_"] == 1e-4
    assert job["config"]["recipe"] == "fast"  # the default recipe, recorded with the job
    again = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 202 and again.json()["id"] == job["id"]
    assert_error(
        alice.post("/v1/jobs", json={**body, "alpha": 0.5}, headers={"Idempotency-Key": "k1"}),
        422,
        "idempotency_conflict",
    )
    # The same Idempotency-Key under another API key is a different job space.
    assert_error(bob.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}), 404)

    # Per-key limit: 2 unfinished jobs; the third answers 429, a replay still works.
    second = alice.post("/v1/jobs", json=job_body(teacher))
    assert second.status_code == 202
    assert_error(alice.post("/v1/jobs", json=job_body(teacher)), 429, "too_many_jobs")
    assert alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()["id"] == job["id"]

    # A model or dataset a live job uses cannot be deleted.
    assert_error(alice.delete(f"/v1/models/{teacher}"), 409, "in_use")

    # Listing, filtering, other keys.
    listed = alice.get("/v1/jobs", params={"state": "queued", "limit": 1})
    assert listed.json()["total"] == 2 and len(listed.json()["items"]) == 1
    assert_error(alice.get("/v1/jobs", params={"state": "sleeping"}), 422)
    assert_error(bob.get(f"/v1/jobs/{job['id']}"), 404)
    assert_error(bob.post(f"/v1/jobs/{job['id']}/cancel"), 404)
    assert_error(bob.get(f"/v1/jobs/{job['id']}/events"), 404)
    assert_error(alice.get(f"/v1/jobs/{job['id']}/report"), 409, "not_ready")
    # Paging offsets and event cursors past the database's 64-bit integers: 422, never a 500 or a
    # stream that ends silently.
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        assert_error(alice.get(path, params={"offset": 2**63}), 422, "invalid_request")
    events_url = f"/v1/jobs/{job['id']}/events"
    assert_error(alice.get(events_url, headers={"Last-Event-ID": "9" * 23}), 422, "invalid_request")
    assert_error(alice.get(events_url, params={"after": 2**63}), 422, "invalid_request")
    assert alice.get(f"/v1/jobs/{job['id']}/artifacts").json() == []

    # Cancel (no worker holds them: at once), then the limit frees up.
    for job_id in (job["id"], second.json()["id"]):
        canceled = alice.post(f"/v1/jobs/{job_id}/cancel")
        assert canceled.status_code == 202 and canceled.json()["state"] == "canceled"
    assert alice.get(f"/v1/jobs/{job['id']}").json()["finished_at"] is not None

    # SSE: the whole log, then a replay from Last-Event-ID gives only what came after.
    events = parse_sse(alice.get(f"/v1/jobs/{job['id']}/events", timeout=30).text)
    states = [json.loads(m["data"])["state"] for m in events if m.get("event") != "end"]
    assert states == ["queued", "canceled"] and events[-1]["event"] == "end"
    first_id = events[0]["id"]
    replay = parse_sse(alice.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": first_id}).text)
    assert [m["id"] for m in replay if m.get("event") != "end"] == [events[1]["id"]]

    third = alice.post("/v1/jobs", json=job_body(teacher))
    assert third.status_code == 202
    alice.post(f"/v1/jobs/{third.json()['id']}/cancel")
    metrics = httpx.get(f"{stack[0]}/metrics").text
    assert 'srcompress_jobs{state="canceled"} 3.0' in metrics


def test_only_the_formats_a_request_can_reach_are_downloaded(monkeypatch, tmp_path):
    """Admitted formats (quality cost within the threshold) and the fastest int8 one that loads; an
    int8 format that cannot load gives way to the next fastest; the rest stay in storage."""
    from types import SimpleNamespace

    from api import serving
    from store.tables import Model

    def entry(name, cost, latency, ok=True):
        return {
            "name": name,
            "files": [f"{name}.bin"],
            "ok": ok,
            "quality_cost_db": cost,
            "latency_ms": latency,
        }

    row = Model(
        id="m",
        formats=[
            entry("onnx", 0.0, 9.0),  # the tuner exports its own fp32 ONNX
            entry("onnx_fp16", 0.01, 8.0),  # admitted
            entry("openvino", 0.0, 7.0, ok=False),  # not offered
            entry("openvino_int8", 0.2, 3.0),  # the fastest int8, but it fails to load
            entry("onnx_int8", 0.2, 4.0),  # so this one serves precision=int8
            entry("ncnn_fp16", 0.5, 2.0),  # over the threshold and not int8: never reachable
        ],
    )
    downloaded: list[str] = []
    blobs = SimpleNamespace(download_to=lambda key, path: downloaded.append(path.name))

    def runner_for(model, name, directory):
        if name == "openvino_int8":
            raise RuntimeError("this runtime cannot read it")
        return f"runner:{name}"

    monkeypatch.setattr(serving, "format_runner_for", runner_for)
    runners, automatic, latency = serving.format_runners(
        SimpleNamespace(blobs=blobs), row, None, tmp_path, threshold_db=0.05
    )
    assert runners == {"onnx_fp16": "runner:onnx_fp16", "onnx_int8": "runner:onnx_int8"}
    assert automatic == ("onnx_fp16",) and latency == {"onnx_fp16": 8.0, "onnx_int8": 4.0}
    assert downloaded == ["onnx_fp16.bin", "openvino_int8.bin", "onnx_int8.bin"]
