"""The web dashboard: its static files under ``/ui`` (api/ui/: plain HTML, CSS and ES modules, nothing
fetched from elsewhere), and the few routes only it needs: before/after crops of a job's held-out images
and a bicubic upscale to show beside a model's. The dashboard calls the ordinary /v1 API with the key
the user typed in (kept in the browser's session storage, sent as ``Authorization: Bearer``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from api.compare import VIEWS, CropCache, holdout_images, job_views, png, to_uint8
from api.crud import owned_job
from api.deps import CurrentCaller, ServicesDep
from api.errors import ApiError, error_responses
from api.serving import check_pixels
from api.uploads import read_upload
from core.data.datasets import bicubic_upscale
from core.data.images import load_rgb_uint8

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
PNG = {200: {"content": {"image/png": {}}}}

router = APIRouter(prefix="/v1", tags=["dashboard"], responses=error_responses(400, 401, 404, 409, 413, 422))


class CropImage(BaseModel):
    index: int
    name: str
    views: dict[str, str]  # view -> URL of its PNG


class CropsOut(BaseModel):
    views: list[str]
    images: list[CropImage]


@router.get("/jobs/{job_id}/crops", response_model=CropsOut, summary="Before/after crops of a job")
def list_crops(job_id: str, services: ServicesDep, caller: CurrentCaller) -> Any:
    """The job's held-out images (chosen its checkpoint, never trained on), each with the URL of its
    crop as bicubic, teacher, student and ground truth."""
    with services.read_sessions() as session:
        names = holdout_images(owned_job(session, caller, job_id))
    base = f"/v1/jobs/{job_id}/crops"
    images = [
        CropImage(index=i, name=name, views={view: f"{base}/{i}/{view}.png" for view in VIEWS})
        for i, name in enumerate(names)
    ]
    return CropsOut(views=list(VIEWS), images=images)


@router.get(
    "/jobs/{job_id}/crops/{index}/{view}.png",
    response_class=Response,
    responses=PNG,
    summary="One crop: the same region as bicubic | teacher | student | gt",
)
def get_crop(
    job_id: str, index: int, view: str, request: Request, services: ServicesDep, caller: CurrentCaller
) -> Response:
    if view not in VIEWS:
        raise ApiError(404, "not_found", f"no view {view!r}; choose from {', '.join(VIEWS)}")
    with services.read_sessions() as session:
        job = owned_job(session, caller, job_id)
        views = job_views(services, request.app.state.crop_cache, session, job, index)
    if view not in views:
        raise ApiError(404, "not_found", f"the {view} model of job {job_id} was deleted")
    return Response(views[view], media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.post("/bicubic", response_class=Response, responses=PNG, summary="Upscale an image with bicubic")
async def bicubic(
    services: ServicesDep,
    caller: CurrentCaller,
    file: UploadFile = File(description="PNG, JPEG, WebP, BMP or TIFF"),
    scale: int = Form(ge=2, le=4, description="upscaling factor"),
) -> Response:
    """MATLAB-compatible bicubic (what the reports call bicubic), to compare with a model's output."""
    settings = services.settings
    data = await run_in_threadpool(read_upload, file, settings.max_upload_bytes)
    check_pixels(data, settings.max_pixels // (scale * scale))

    def upscale() -> bytes:  # a bad image is core's ImageError: 422 (api.errors), too large: 413
        return png(to_uint8(bicubic_upscale(load_rgb_uint8(data, settings.max_pixels), scale)))

    return Response(await run_in_threadpool(upscale), media_type="image/png")


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at /ui (and send / there), and its routes."""
    app.state.crop_cache = CropCache()
    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def dashboard() -> RedirectResponse:
        return RedirectResponse("/ui/")
