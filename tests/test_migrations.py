"""`alembic upgrade head` builds exactly the schema of store.tables, on SQLite and on Postgres."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from store.db import alembic_config, make_engine, migrate
from store.tables import Base
from tests.service_helpers import unavailable
from tests.stores import postgres_unavailable_reason, throwaway_postgres_database

pytestmark = [pytest.mark.service]  # needs PostgreSQL/Redis/S3 or starts processes

REPO = Path(__file__).resolve().parents[1]
TABLES = {
    "alembic_version",
    "api_keys",
    "models",
    "datasets",
    "jobs",
    "job_events",
    "artifacts",
    "webhook_deliveries",
}


def alembic_cli(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the real `alembic` command line from the repository root (it reads alembic.ini there)."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def check_upgrade_downgrade(url: str, env: dict[str, str] | None = None, x_url: bool = True) -> None:
    args = ["-x", f"db_url={url}"] if x_url else []
    output = alembic_cli(*args, "upgrade", "head", env=env)
    assert "Running upgrade  -> 0001" in output and "Running upgrade 0001 -> 0002" in output
    assert table_names(url) == TABLES
    assert schema_diff(url) == []  # what autogenerate would write next: nothing
    alembic_cli(*args, "downgrade", "base", env=env)
    assert table_names(url) == {"alembic_version"}
    migrate(url)  # the programmatic path the API uses at startup
    assert table_names(url) == TABLES and schema_diff(url) == []


def test_one_linear_history():
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert scripts.get_heads() == ["0004"]
    assert [rev.revision for rev in scripts.walk_revisions()] == ["0004", "0003", "0002", "0001"]


def test_upgrade_head_on_sqlite_from_settings(tmp_path):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    # No -x: env.py must take the URL from Settings, i.e. SRCOMPRESS_DATABASE_URL.
    check_upgrade_downgrade(url, env={"SRCOMPRESS_DATABASE_URL": url}, x_url=False)


def test_upgrade_head_on_postgres():
    reason = postgres_unavailable_reason()
    if reason:
        unavailable(reason)
    with throwaway_postgres_database() as url:
        check_upgrade_downgrade(url)


def test_offline_sql_renders_for_postgres():
    output = alembic_cli(
        "-x", "db_url=postgresql+psycopg://nobody@127.0.0.1:1/none", "upgrade", "head", "--sql"
    )
    assert "CREATE TABLE jobs" in output and "TIMESTAMP WITH TIME ZONE" in output
