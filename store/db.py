"""Engines and sessions for SQLite (embedded default) and Postgres (production).

SQLite is shared by the API and worker processes, so every connection gets WAL (readers never block
the writer), foreign keys (off by default in SQLite!) and a busy timeout, and every transaction starts
with ``BEGIN IMMEDIATE``: the write lock is taken up front, so two processes queue on the busy timeout
instead of failing with "database is locked" when a read transaction later tries to write. The price is
that SQLite write transactions are serialized, so keep sessions short (open one per request / per step,
never across a long wait such as an SSE poll loop), and read through ``read_session_factory``, whose
sessions begin DEFERRED and run beside a writer.

Store functions flush but never commit; the caller owns the transaction::

    with session_factory(engine).begin() as session:
        leases.claim(session, job_id, worker_id, lease_seconds=60)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from store.tables import Base

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_BEGIN_OPTION = "sqlite_begin"  # execution option: "IMMEDIATE" (default) or "DEFERRED"
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"


def _install_sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see "begin" below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")  # persistent; a no-op (memory) for :memory:
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL, much faster
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str, *, echo: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url``; for a SQLite file its directory is created and the pragmas installed."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("check_same_thread", False)
        engine = create_engine(url, echo=echo, **kwargs)
        _install_sqlite_pragmas(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)  # survive Postgres restarts between requests
    return create_engine(url, echo=echo, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects stay readable after commit (API responses are built from them).
    return sessionmaker(bind=engine, expire_on_commit=False)


def read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for reading only (GET endpoints, SSE polling). On SQLite they begin DEFERRED, so they
    neither wait for nor block writers (WAL gives them a snapshot); a write through one may fail with
    "database is locked". On Postgres they are ordinary sessions."""
    if engine.dialect.name == "sqlite":
        engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
    return sessionmaker(bind=engine, expire_on_commit=False)


def init_db(engine: Engine) -> None:
    """Create all tables straight from the metadata (tests, throwaway databases). Production: migrate()."""
    Base.metadata.create_all(engine)


def alembic_config(url: str) -> Any:
    """An Alembic Config for this repository's migrations, pointed at ``url``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal '%' (URL-encoded passwords) must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` with Alembic (what the API runs at startup)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
