"""The FastAPI application: ``create_app(settings)``; ``app`` is the instance uvicorn serves
(``uvicorn api.app:app``), configured from the environment (SRCOMPRESS_*) when it starts."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from api.deps import Services
from api.errors import install_error_handlers
from api.routes import datasets, health, jobs, models, upscale, webhooks
from api.routes.ui import mount_dashboard
from api.uploads import BodyLimit
from store.settings import Settings

log = logging.getLogger("srcompress.api")

API_VERSION = "1.0.0"
# Multipart overhead allowed on top of max_upload_bytes before a request is refused by its length alone.
MULTIPART_SLACK_BYTES = 64 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app. Services (database engine, blob store, broker client, upscale pool, model cache) are
    created when the app starts (lifespan) from ``settings``, or from the environment when None."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or Settings()
        services = Services.build(resolved)
        app.state.services = services
        try:
            datasets.ensure_sample_dataset(services)
        except Exception:  # the API still serves everything else; /readyz shows what is down
            log.exception("could not register the built-in sample dataset")
        try:
            yield
        finally:
            services.close()

    app = FastAPI(
        title="srcompress",
        version=API_VERSION,
        description="Compress deep image super-resolution models (Jiang et al., 2024) and serve them. "
        "Every /v1 route needs `Authorization: Bearer <key>`. Errors are "
        '`{"error": {"code", "message", "details"}}`.',
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Innermost (added first): its 413 is raised straight into FastAPI's body parsing, not through
    # the metrics middleware's task, which would turn it into a 400.
    app.add_middleware(BodyLimit, limit=_body_limit)

    @app.middleware("http")
    async def request_metrics(request: Request, call_next) -> Response:  # type: ignore[no-untyped-def]
        began = time.perf_counter()
        services: Services | None = getattr(request.app.state, "services", None)
        response = await call_next(request)
        if services is not None:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            metrics = services.metrics
            metrics.requests.labels(request.method, template, str(response.status_code)).inc()
            metrics.latency.labels(template).observe(time.perf_counter() - began)
        return response

    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(upscale.router)
    app.include_router(webhooks.router)
    mount_dashboard(app)  # the web dashboard at /ui and the crops it shows
    return app


def _body_limit(app: FastAPI) -> int | None:
    services: Services | None = getattr(app.state, "services", None)
    return None if services is None else services.settings.max_upload_bytes + MULTIPART_SLACK_BYTES


app = create_app()
