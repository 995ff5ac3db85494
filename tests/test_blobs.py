"""Blob stores: a local directory and S3 over real HTTP (moto's server), with the same behaviour."""

import os
import urllib.request
from pathlib import Path

import pytest

from store.blobs import (
    BlobKeyError,
    BlobNotFound,
    LocalBlobStore,
    S3BlobStore,
    check_key,
    download_dir,
    join_key,
    make_blob_store,
    upload_dir,
)
from store.settings import Settings
from tests.stores import moto_s3_server

CREDENTIALS = {"access_key": "testing", "secret_key": "testing"}
UNSAFE_KEYS = [
    "",
    "/etc/passwd",
    "../x",
    "a/../../x",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "C:/x",
    "a\x00b",
    "x\ny",
]


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("s3_endpoint")
    # A fresh bucket per test, created by the store itself.
    return S3BlobStore(f"bucket-{os.urandom(4).hex()}", endpoint_url=endpoint, **CREDENTIALS)


@pytest.mark.slow
def test_bytes_round_trip(store):
    store.put_bytes(
        "models/m1/weights.safetensors", b"\x00weights\xff", content_type="application/octet-stream"
    )
    assert store.exists("models/m1/weights.safetensors") and not store.exists("models/m1/missing")
    assert store.get_bytes("models/m1/weights.safetensors") == b"\x00weights\xff"
    assert store.size("models/m1/weights.safetensors") == 9
    store.put_bytes("models/m1/weights.safetensors", b"v2")  # overwrite
    with store.open_stream("models/m1/weights.safetensors") as stream:
        assert stream.read(1) == b"v" and stream.read() == b"2"
    store.delete("models/m1/weights.safetensors")
    store.delete("models/m1/weights.safetensors")  # deleting a missing blob is fine
    assert not store.exists("models/m1/weights.safetensors") and store.list() == []


def test_missing_blobs_raise_blob_not_found(store, tmp_path):
    for read in (store.get_bytes, store.size, store.open_stream):
        with pytest.raises(BlobNotFound):
            read("nothing/here")
    with pytest.raises(BlobNotFound):
        store.download_to("nothing/here", tmp_path / "out" / "file")
    assert not (tmp_path / "out" / "file").exists()


def test_files_round_trip_including_multipart_sizes(store, tmp_path):
    payload = os.urandom(9 * 2**20 + 123)  # above boto3's 8 MiB multipart threshold
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    store.put_file("jobs/j1/work/ckpt.pt", source)
    target = store.download_to("jobs/j1/work/ckpt.pt", tmp_path / "restored" / "ckpt.pt")
    assert target.read_bytes() == payload and store.size("jobs/j1/work/ckpt.pt") == len(payload)
    assert sorted(os.listdir(target.parent)) == ["ckpt.pt"]  # no temp file left behind


def test_prefixes_are_folders(store):
    for key in ["jobs/1/a", "jobs/1/sub/b", "jobs/10/c", "jobs/1x", "models/m"]:
        store.put_bytes(key, key.encode())
    assert store.list("jobs/1") == store.list("jobs/1/") == ["jobs/1/a", "jobs/1/sub/b"]
    assert store.list("jobs") == ["jobs/1/a", "jobs/1/sub/b", "jobs/10/c", "jobs/1x"]
    assert store.list() == sorted(["jobs/1/a", "jobs/1/sub/b", "jobs/10/c", "jobs/1x", "models/m"])
    assert store.list("nope") == []
    assert store.delete_prefix("jobs/1") == 2
    assert store.list() == ["jobs/10/c", "jobs/1x", "models/m"]
    with pytest.raises(BlobKeyError):
        store.delete_prefix("")


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(BlobKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(BlobKeyError):
        store.exists(key)


def test_key_helpers():
    assert check_key("jobs/1/work/.done") == "jobs/1/work/.done"
    assert join_key("jobs/", "/1", "", "report.json") == "jobs/1/report.json"
    with pytest.raises(BlobKeyError):
        join_key("jobs", "..", "x")
    with pytest.raises(BlobKeyError):
        check_key("x" * 1025)


def test_local_store_stays_inside_its_root(tmp_path):
    store = LocalBlobStore(tmp_path / "root")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root" / "link").symlink_to(outside)
    with pytest.raises(BlobKeyError, match="outside"):
        store.put_bytes("link/secret", b"x")
    with pytest.raises(BlobKeyError, match="reserved"):
        store.put_bytes(".incoming/x", b"x")
    assert list(outside.iterdir()) == []
    store.put_bytes("a/b/c", b"x")
    store.delete("a/b/c")
    assert not (tmp_path / "root" / "a").exists()  # empty folders are pruned
    assert store.url_for("a") is None


def test_s3_presigned_url_serves_the_blob_over_http(s3_endpoint):
    store = S3BlobStore("presign-bucket", endpoint_url=s3_endpoint, **CREDENTIALS)
    store.put_bytes("models/m/out.onnx", b"onnx bytes", content_type="application/octet-stream")
    url = store.url_for("models/m/out.onnx", expires_seconds=300)
    assert url.startswith(s3_endpoint + "/presign-bucket/models/m/out.onnx?") and "Expires=300" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"onnx bytes"
    # A second store on an existing bucket reuses it.
    assert S3BlobStore("presign-bucket", endpoint_url=s3_endpoint, **CREDENTIALS).list() == [
        "models/m/out.onnx"
    ]


def test_workdir_mirror_round_trip(store, tmp_path):
    workdir = tmp_path / "work"
    files = {
        "ckpt/iter_100.pt": b"a" * 1000,
        "ckpt/iter_200.pt": b"b" * 10,
        "state.json": b"{}",
        ".done": b"",
    }
    for relative, content in files.items():
        (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
        (workdir / relative).write_bytes(content)
    keys = upload_dir(store, workdir, "jobs/j7/work")
    assert sorted(keys) == sorted(f"jobs/j7/work/{name}" for name in files)
    (workdir / "ckpt/iter_100.pt").unlink()  # the worker rotated an old checkpoint out
    upload_dir(store, workdir, "jobs/j7/work/", delete_extra=True)
    assert "jobs/j7/work/ckpt/iter_100.pt" not in store.list("jobs/j7")

    restored = tmp_path / "resumed"
    paths = download_dir(store, "jobs/j7/work", restored)
    assert sorted(p.relative_to(restored).as_posix() for p in paths) == sorted(
        set(files) - {"ckpt/iter_100.pt"}
    )
    assert (restored / "ckpt/iter_200.pt").read_bytes() == b"b" * 10 and (
        restored / ".done"
    ).read_bytes() == b""
    with pytest.raises(BlobKeyError):
        upload_dir(store, workdir, "")


def test_make_blob_store_follows_settings(tmp_path, s3_endpoint):
    local = make_blob_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalBlobStore) and local.root == (tmp_path / "blobs").resolve()
    s3 = make_blob_store(
        Settings(
            data_dir=tmp_path,
            blob_backend="s3",
            s3_endpoint_url=s3_endpoint,
            s3_bucket="from-settings",
            s3_access_key="testing",
            s3_secret_key="testing",
        )
    )
    assert isinstance(s3, S3BlobStore)
    s3.put_bytes("k", b"v")
    assert s3.get_bytes("k") == b"v" and Path(tmp_path / "blobs").is_dir()
