"""What a request needs: the app's services (settings, database, blobs, queue), sessions and the caller.

``Services`` is built once per app in its lifespan and hung on ``app.state.services``; nothing here is a
module-level global, so two apps (tests) never share state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError
from api.metrics import Metrics
from api.presets import PresetTable
from api.serving import BackendTuner, ModelCache, UpscalePool
from store.apikeys import find_api_key
from store.blobs import BlobStore, make_blob_store
from store.db import make_engine, read_session_factory, session_factory
from store.settings import Settings

log = logging.getLogger("srcompress.api")

# Row offsets and event ids a client may send: bounded so that no value overflows the database's
# 64-bit integers (an offset of 2^63 was a 500), and far above anything a table holds.
MAX_OFFSET = 2**53
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip")]


def make_celery_client(settings: Settings) -> Any:
    """A Celery app that only sends tasks by name (the worker's code is not imported here)."""
    from celery import Celery

    client = Celery("srcompress-api", broker=settings.broker_url)
    client.conf.update(
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        # Do not hang a request when the broker is down: fail fast, the API answers 503.
        broker_connection_timeout=5,
        broker_transport_options={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
    )
    return client


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]
    blobs: BlobStore
    celery: Any
    upscale_pool: UpscalePool
    model_cache: ModelCache
    backend_tuner: BackendTuner
    presets: PresetTable
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self)  # reads the services at scrape time

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings.database_url)
        cache_dir = settings.data_dir / "cache"
        return cls(
            settings=settings,
            engine=engine,
            sessions=session_factory(engine),
            read_sessions=read_session_factory(engine),
            blobs=make_blob_store(settings),
            celery=make_celery_client(settings),
            upscale_pool=UpscalePool(settings.upscale_concurrency, settings.upscale_queue),
            model_cache=ModelCache(settings.model_cache_bytes),
            backend_tuner=BackendTuner(cache_dir),
            presets=PresetTable(cache_dir),
        )

    def close(self) -> None:
        self.upscale_pool.shutdown()
        self.backend_tuner.shutdown()
        self.engine.dispose()


def get_services(request: Request) -> Services:
    return request.app.state.services


def read_session(services: Services = Depends(get_services)) -> Iterator[Session]:
    with services.read_sessions() as session:
        yield session


@dataclass(frozen=True)
class Caller:
    """The authenticated API key."""

    key_id: str
    name: str


def current_caller(request: Request, services: Services = Depends(get_services)) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send 'Authorization: Bearer <key>' "
            "(create one with `srcompress keys create NAME`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with services.read_sessions() as session:
        row = find_api_key(session, token.strip())
        if row is None:
            raise ApiError(
                401, "unauthorized", "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"}
            )
        caller = Caller(key_id=row.id, name=row.name)
    request.state.caller = caller
    return caller


# What a route declares to get them: `services: ServicesDep`, `caller: CurrentCaller`, `session: ReadSession`.
ServicesDep = Annotated[Services, Depends(get_services)]
CurrentCaller = Annotated[Caller, Depends(current_caller)]
ReadSession = Annotated[Session, Depends(read_session)]
