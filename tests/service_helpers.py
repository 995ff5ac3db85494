"""Helpers shared by the API and lifecycle tests: start a real uvicorn process, make images/archives."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def unavailable(reason: str) -> NoReturn:
    """A test's service or data is missing: skip, or fail under CI=true (where everything must run)."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (under CI=true a missing service or shared file is a failure)")
    pytest.skip(reason)


def png_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    # Smooth content (a gradient plus noise) so models and codecs see something image-like.
    y, x = np.mgrid[0:height, 0:width]
    base = ((x + y) * 255 / max(width + height - 2, 1))[..., None]
    pixels = np.clip(base + rng.normal(0, 20, (height, width, channels)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], links: dict[str, tuple[str, str]] | None = None) -> bytes:
    """A tar.gz; ``links`` maps a member name to ("sym" | "hard", target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_until_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} did not become healthy:\n{log_path.read_text()[-4000:]}")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def uvicorn_server(env: dict[str, str], port: int, log_path: Path) -> Iterator[str]:
    """`uvicorn api.app:app` in its own process with ``env``; yields its base URL."""
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until_healthy(url, process, log_path)
        yield url
    finally:
        stop(process)


@contextmanager
def embedded_server(tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, str, Path]]:
    """`srcompress serve` with only a data directory (it migrates, prints the first key and starts a
    worker), in its own process with no SRCOMPRESS_* variables but ``extra_env``; yields (url, key, log)."""
    from tests.stores import free_port

    port = free_port()
    log_path = tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRCOMPRESS_")}
    env.update(extra_env or {})
    command = [
        sys.executable,
        "-m",
        "srcompress",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(tmp / "data"),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process, log_path, timeout=120)
        match = re.search(r"first API key \(shown once\): (\S+)", log_path.read_text())
        assert match, log_path.read_text()
        yield url, match.group(1), log_path
    except BaseException:
        print(f"--- serve.log ---\n{log_path.read_text()[-6000:]}")
        raise
    finally:
        stop(process, timeout=40)


def create_key(env: dict[str, str], name: str) -> str:
    """A raw API key made by the real CLI (`python -m srcompress keys create NAME`)."""
    result = subprocess.run(
        [sys.executable, "-m", "srcompress", "keys", "create", name],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def parse_sse(text: str) -> list[dict[str, str]]:
    """SSE messages as dicts of their fields (id, event, data); comments and retry lines dropped."""
    messages = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "data" in fields:
            messages.append(fields)
    return messages
