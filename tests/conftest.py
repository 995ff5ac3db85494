"""Shared fixtures. Data and weights live in ../shared beside the repository and are never copied in.

Without ../shared a test that needs it skips with a reason; under CI=true it fails instead, so the
literature figures are checked on every submission.
"""

import os
from pathlib import Path

import pytest

from tests.service_helpers import unavailable

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SRCOMPRESS_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """Backend decisions and ONNX graphs of the whole run (and of the processes it starts) go to a
    temporary folder, not the user's ~/.cache/srcompress."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SRCOMPRESS_CACHE", str(tmp_path_factory.mktemp("srcompress-cache")))
        yield


def _require(path: Path) -> Path:
    if not path.exists():
        unavailable(f"needs {path} (the shared data/weights beside the repository)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: benchmark/ (Set5, Set14, B100) and train/."""
    return _require(SHARED / "data")


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    """../shared/weights: the real pretrained RLFN checkpoints."""
    return _require(SHARED / "weights")


@pytest.fixture
def app_client(tmp_path):
    """A real app on SQLite (no worker) and a key: (client, key id, webhook secret, engine)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.apikeys import create_api_key
    from store.db import make_engine, migrate, session_factory
    from store.settings import Settings

    settings = Settings(data_dir=tmp_path)
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    with session_factory(engine).begin() as session:
        key, raw = create_api_key(session, "api")
        key_id, secret = key.id, key.webhook_secret
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {raw}"
        yield client, key_id, secret, engine
    engine.dispose()
