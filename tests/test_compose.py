"""docker-compose.yml and scripts/stack.sh describe the same production topology with the settings names
that store.settings.Settings reads; and stack.sh really starts it from local processes."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from store.settings import Settings
from tests.service_helpers import unavailable
from tests.stores import free_port, postgres_unavailable_reason, throwaway_postgres_database

pytestmark = [pytest.mark.service, pytest.mark.slow]  # needs PostgreSQL/Redis/S3 or starts processes

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
STACK = REPO / "scripts" / "stack.sh"
SETTINGS_NAMES = {f"SRCOMPRESS_{name.upper()}" for name in Settings.model_fields}
ENV_NAME = re.compile(r"\bSRCOMPRESS_[A-Z0-9_]+\b")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command_text(service: dict) -> str:
    command = service.get("command") or service.get("entrypoint") or ""
    return " ".join(command) if isinstance(command, list) else str(command)


def test_compose_has_the_production_services(compose):
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "minio", "migrate"} <= set(services)
    assert "uvicorn api.app:app" in command_text(services["api"])
    assert "srcompress worker" in command_text(services["worker"])
    assert "alembic upgrade head" in command_text(services["migrate"])
    # Something creates the bucket in MinIO before the API and the workers start.
    bucket = [name for name, s in services.items() if "mc mb" in command_text(s)]
    assert bucket, "no service creates the MinIO bucket"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends[bucket[0]]["condition"] == "service_completed_successfully"
    assert "Dockerfile.gpu" in str(services["worker"]["build"])


def test_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_compose_env_names_are_settings_fields_and_point_at_the_services(compose):
    services = compose["services"]
    for name in ("api", "worker", "migrate"):
        env = service_env(services[name])
        assert set(env) <= SETTINGS_NAMES, set(env) - SETTINGS_NAMES
        # Production: Postgres, Redis and S3 (MinIO), not the embedded defaults.
        assert (
            env["SRCOMPRESS_DATABASE_URL"].startswith("postgresql+psycopg://")
            and "@postgres:" in env["SRCOMPRESS_DATABASE_URL"]
        )
        assert env["SRCOMPRESS_BROKER_URL"].startswith("redis://redis:")
        assert env["SRCOMPRESS_BLOB_BACKEND"] == "s3" and "minio:9000" in env["SRCOMPRESS_S3_ENDPOINT_URL"]
        Settings(**{k.removeprefix("SRCOMPRESS_").lower(): v for k, v in env.items()})  # values validate
    # MinIO's credentials are the ones the services use.
    minio = service_env(services["minio"])
    env = service_env(services["api"])
    assert minio["MINIO_ROOT_USER"] == env["SRCOMPRESS_S3_ACCESS_KEY"]
    assert minio["MINIO_ROOT_PASSWORD"] == env["SRCOMPRESS_S3_SECRET_KEY"]
    # Every SRCOMPRESS_ name anywhere in the file (anchors included) is a settings field.
    assert set(ENV_NAME.findall(COMPOSE.read_text())) <= SETTINGS_NAMES


def test_stack_script_uses_the_same_settings_names_as_compose(compose):
    script_names = set(ENV_NAME.findall(STACK.read_text()))
    compose_names = set(service_env(compose["services"]["worker"]))
    assert script_names <= SETTINGS_NAMES, script_names - SETTINGS_NAMES
    assert script_names == compose_names, script_names ^ compose_names


def test_stack_script_starts_and_stops_the_topology(tmp_path):
    """start → the API answers /healthz, a worker is ready, the env is printed; stop → all gone."""
    reason = postgres_unavailable_reason()
    if reason:
        unavailable(reason)
    with throwaway_postgres_database() as database_url:
        api_port = free_port()
        env = {
            **os.environ,
            "STACK_DIR": str(tmp_path / "stack"),
            "API_PORT": str(api_port),
            "S3_PORT": str(free_port()),
            "WORKERS": "1",
            "WORKER_POOL": "solo",
            "SRCOMPRESS_DATABASE_URL": database_url,
            "SRCOMPRESS_BROKER_URL": "redis://127.0.0.1:6379/7",
        }
        try:
            started = subprocess.run(
                ["bash", str(STACK), "start"], env=env, capture_output=True, text=True, timeout=240
            )
            assert started.returncode == 0, started.stderr[-3000:]
            printed = dict(re.findall(r"export (SRCOMPRESS_[A-Z0-9_]+)=(.*)", started.stdout))
            assert printed["SRCOMPRESS_DATABASE_URL"] == database_url
            # (names this process already had, e.g. the test run's SRCOMPRESS_CACHE, pass through)
            inherited = {name for name in os.environ if name.startswith("SRCOMPRESS_")}
            assert set(printed) - inherited <= SETTINGS_NAMES
            assert f"API_URL=http://127.0.0.1:{api_port}" in started.stdout
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=5) as response:
                assert response.status == 200
            status = subprocess.run(["bash", str(STACK), "status"], env=env, capture_output=True, text=True)
            print(status.stdout)
            assert {"api", "s3", "worker1"} <= {line.split()[0] for line in status.stdout.splitlines()}
            assert "dead" not in status.stdout
        finally:
            subprocess.run(["bash", str(STACK), "stop"], env=env, capture_output=True, text=True, timeout=60)
        status = subprocess.run(["bash", str(STACK), "status"], env=env, capture_output=True, text=True)
        assert status.stdout.strip() == ""
