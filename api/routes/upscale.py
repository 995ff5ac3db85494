"""POST /v1/upscale: one image through a stored model, with hard limits and back-pressure.

- Limits: upload bytes (413), pixels (413, checked from the header before decoding), bad images (422).
- Back-pressure: at most ``upscale_concurrency`` inferences run (a thread pool of that size) and at most
  ``upscale_queue`` more wait; past that the request is refused at once with 503 + Retry-After instead
  of piling up (clients retry; the server's memory stays bounded).
- Loaded models are kept in an LRU cache bounded by ``model_cache_bytes`` (parameter + buffer bytes).
- Inference path (``upscale_backend``, default auto): a newly loaded model is served eagerly at once while
  `BackendTuner` measures its fastest path within 0.05 dB of fp32 (core.infer.tuning.choose_backend) on one
  background thread; the cached model then switches to it. The decision is stored on disk, so the next
  load of the same model (another process, a restart) starts on the fast path. The 0.05 dB parity
  that admits bf16/fp16 is measured on 8-bit output; a 16-bit image is always served on an exact fp32
  path (bf16 keeps 8 bits of mantissa: about 700 distinct values per channel instead of 23,000).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.crud import owned_model
from api.deps import CurrentCaller, ServicesDep
from api.errors import ApiError, error_responses
from api.serving import check_pixels, upscale_image
from api.uploads import read_upload
from core.models.presets import PRESETS
from store.tables import Model

log = logging.getLogger("srcompress.api")

router = APIRouter(prefix="/v1", tags=["upscale"], responses=error_responses(400, 401, 404, 413, 422, 503))

MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
RETRY_AFTER_SECONDS = 2


@router.post(
    "/upscale",
    summary="Upscale one image with a stored model",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
)
async def upscale(
    services: ServicesDep,
    caller: CurrentCaller,
    file: UploadFile = File(description="PNG, JPEG, WebP, BMP or TIFF"),
    model_id: str = Form(description="a model id (an upload or a job's result)"),
    preset: str | None = Form(None, description="load the model's weights into this preset's architecture"),
    format: str = Form("png", pattern="^(auto|png|jpg|jpeg|webp)$", description="output format"),
    tile: int | None = Form(None, ge=32, le=2048, description="LR tile size (default: sized from memory)"),
    precision: str = Form(
        "auto",
        pattern="^(auto|fp32|int8)$",
        description="auto: the fastest path within the quality threshold; fp32: exact; int8: the model's "
        "fastest int8 format whatever its cost",
    ),
) -> Response:
    settings = services.settings
    if preset is not None and preset not in PRESETS:
        raise ApiError(
            422, "invalid_request", f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}"
        )
    data = await run_in_threadpool(read_upload, file, settings.max_upload_bytes)
    check_pixels(data, settings.max_pixels)

    def find_model() -> Model:
        with services.read_sessions() as session:
            return owned_model(session, caller, model_id)

    row = await run_in_threadpool(find_model)
    pool = services.upscale_pool
    if not pool.try_admit():
        raise ApiError(
            503,
            "busy",
            "the upscale queue is full; retry shortly",
            {"capacity": pool.capacity},
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    try:
        result = await asyncio.get_running_loop().run_in_executor(
            pool.executor, upscale_image, services, row, preset, data, format, tile, precision
        )
    finally:
        pool.done()
    encoded, output_format, backend, backend_precision = result
    return Response(
        encoded,
        media_type=MEDIA_TYPES[output_format],
        headers={
            "Content-Disposition": f'inline; filename="upscaled.{output_format}"',
            "X-Srcompress-Backend": backend,
            "X-Srcompress-Precision": backend_precision,
        },
    )
