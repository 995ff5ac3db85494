"""Alembic environment: the target is store.tables' metadata, the URL comes from store.settings.

URL precedence: ``-x db_url=...`` on the command line, then ``sqlalchemy.url`` set by the caller
(store.db.migrate), then Settings().database_url (SRCOMPRESS_DATABASE_URL or the SQLite default).
"""

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.pool import NullPool

from store.db import make_engine
from store.settings import Settings
from store.tables import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

# Configure logging only for the alembic command line; a program calling migrate() keeps its own.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    cli_url = context.get_x_argument(as_dictionary=True).get("db_url")
    return cli_url or config.get_main_option("sqlalchemy.url") or Settings().database_url


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Autogenerate renders the UTCDateTime decorator as its plain column type, so that revisions do
    not import store.tables (a later edit of it must not change what an old revision creates)."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure(url: str, connection: Connection | None = None) -> None:
    context.configure(
        url=None if connection is not None else url,
        connection=connection,
        target_metadata=target_metadata,
        literal_binds=connection is None,
        # SQLite cannot ALTER most things; batch mode rebuilds the table there and emits plain ALTERs on
        # Postgres, so revisions are always rendered in batch mode and run on both.
        render_as_batch=True,
        render_item=render_item,
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (alembic upgrade --sql) without a database connection."""
    configure(database_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            configure(url, connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
