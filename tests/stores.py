"""Helpers for tests that talk to real services: a throwaway Postgres database and a moto S3 server.

Used by tests/test_store.py, test_blobs.py and test_migrations.py, and meant for the API and worker
tests too. Nothing here runs in production.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import closing, contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# The service database of the test machine; override with SRCOMPRESS_TEST_POSTGRES_URL.
DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_test_url() -> str:
    return os.environ.get("SRCOMPRESS_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL)


def postgres_unavailable_reason(url: str | None = None) -> str | None:
    """None if Postgres at ``url`` answers, else why not (for pytest.skip)."""
    url = url or postgres_test_url()
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # any failure means "not usable here"
        return f"Postgres at {make_url(url).render_as_string(hide_password=True)} unreachable: {error}"
    return None


@contextmanager
def throwaway_postgres_database(base_url: str | None = None) -> Iterator[str]:
    """Create database ``srcompress_test_<random>`` next to ``base_url``'s, yield its URL, drop it.

    Other tests using the shared database are never touched, and parallel runs do not collide.
    """
    base = make_url(base_url or postgres_test_url())
    name = f"srcompress_test_{secrets.token_hex(6)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")  # CREATE DATABASE cannot run in a txn
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                # FORCE (Postgres 13+) ends sessions a failed test left open.
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def free_port(host: str = "127.0.0.1") -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_s3_server(host: str = "127.0.0.1") -> Iterator[str]:
    """Run moto's S3 server over real HTTP on a free port; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
