"""Models: presets, checkpoint upload (validated by loading it with weights_only), list/show/delete and
download as safetensors + config (+ ONNX): a presigned URL on S3, a stream from the local backend."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session
from torch import nn

from api.crud import model_in_use, owned_model, stream_blob
from api.deps import (
    Caller,
    CurrentCaller,
    Offset,
    ReadSession,
    Services,
    ServicesDep,
)
from api.errors import ApiError, error_responses, not_found
from api.schemas import DownloadOut, ModelOut, Page, PresetOut
from api.uploads import save_upload
from core.models.checkpoint import load_checkpoint, save_model
from core.models.config import SCALES
from core.models.presets import PRESETS
from store.blobs import BlobStore
from store.models import BINARY, CONTENT_TYPES, model_files, put_model_files, register_model
from store.tables import Model, new_id, utcnow

router = APIRouter(
    prefix="/v1", tags=["models"], responses=error_responses(400, 401, 404, 409, 413, 422, 503)
)

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
URL_EXPIRES_SECONDS = 3600


# --- presets ------------------------------------------------------------------------------------------


@router.get("/presets", response_model=list[PresetOut], summary="Model presets with params and MACs")
def list_presets(
    services: ServicesDep,
    _caller: CurrentCaller,
    name: str | None = Query(None, description="only this preset"),
    scale: int | None = Query(None, description="only this scale (2, 3 or 4)"),
) -> Any:
    """Params and MACs (at the default LR size, 640x360 for x2) of every preset at every scale."""
    if name is not None and name not in PRESETS:
        raise ApiError(
            422, "invalid_request", f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        )
    if scale is not None and scale not in SCALES:
        raise ApiError(422, "invalid_request", f"scale must be one of {', '.join(map(str, SCALES))}")
    return services.presets.get([name] if name else list(PRESETS), [scale] if scale else list(SCALES))


def complexity_of(model: nn.Module) -> tuple[int, int]:
    from core.complexity import count_macs, count_params

    return count_params(model).total, count_macs(model).macs


# --- upload -------------------------------------------------------------------------------------------


@router.post("/models", status_code=201, response_model=ModelOut, summary="Upload a checkpoint")
def upload_model(
    services: ServicesDep,
    caller: CurrentCaller,
    file: UploadFile = File(
        description=".pth/.pt (state_dict, optionally under params/params_ema) or .safetensors"
    ),
    name: str | None = Form(None, max_length=200),
    family: str | None = Form(None, description="edsr | swinir | rlfn; detected when omitted"),
    scale: int | None = Form(None, description="2 | 3 | 4; detected when omitted"),
    preset: str | None = Form(None, description="a preset whose hyper-parameters the checkpoint has"),
) -> Any:
    filename = Path(file.filename or "checkpoint.pth").name
    suffix = Path(filename).suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        suffix = ".pth"  # unknown extension: try it as a PyTorch pickle (weights_only, so safe)
    with tempfile.TemporaryDirectory(prefix="srcompress-upload-") as tmp:
        upload_path = Path(tmp, "upload", "checkpoint" + suffix)
        save_upload(file, upload_path, services.settings.max_upload_bytes)
        # weights_only=True inside: a pickle that needs code to load is refused, never executed.
        model, info = load_checkpoint(upload_path, family=family, scale=scale, preset=preset)
        model_id = new_id()
        model_dir = save_model(model, Path(tmp, "model"))
        params, macs = complexity_of(model)
        config = info.config.model_dump(mode="json")
        keys = put_model_files(services.blobs, model_id, model_dir)
        try:
            with services.sessions.begin() as session:
                row = register_model(
                    session,
                    model_id,
                    model_dir,
                    keys,
                    owner_key_id=caller.key_id,
                    name=name or Path(filename).stem,
                    family=config["family"],
                    scale=config["scale"],
                    config=config,
                    source="upload",
                    params=params,
                    macs=macs,
                    metrics={"load_notes": info.notes, "original_filename": filename},
                )
        except Exception:
            for key in keys.values():
                services.blobs.delete(key)
            raise
    return ModelOut.of(row)


# --- list / show / delete -------------------------------------------------------------------------------


@router.get("/models", response_model=Page[ModelOut], summary="The caller's models")
def list_models(
    session: ReadSession,
    caller: CurrentCaller,
    limit: int = Query(50, ge=1, le=200),
    offset: Offset = 0,
    source: str | None = Query(None, pattern="^(upload|job|builtin)$"),
) -> Any:
    where = [Model.owner_key_id == caller.key_id, Model.deleted_at.is_(None)]
    if source:
        where.append(Model.source == source)
    return Page[ModelOut].of_rows(session, Model, where, ModelOut.of, limit, offset)


@router.get("/models/{model_id}", response_model=ModelOut, summary="One model")
def show_model(
    model_id: str,
    session: ReadSession,
    caller: CurrentCaller,
) -> Any:
    return ModelOut.of(owned_model(session, caller, model_id))


@router.delete("/models/{model_id}", status_code=204, summary="Delete a model (409 while a live job uses it)")
def delete_model(
    model_id: str,
    services: ServicesDep,
    caller: CurrentCaller,
) -> Response:
    # Committed before the 204 is sent (a yield dependency may commit after it): a following GET sees it.
    with services.sessions.begin() as session:
        return _delete_model(session, services, caller, model_id)


def _delete_model(session: Session, services: Services, caller: Caller, model_id: str) -> Response:
    row = owned_model(session, caller, model_id)
    if row.owner_key_id is None:
        raise ApiError(409, "builtin", f"model {model_id} is built in and cannot be deleted")
    if model_in_use(session, model_id):
        raise ApiError(409, "in_use", f"model {model_id} is the teacher of a queued or running job")
    row.deleted_at = utcnow()  # soft delete: finished jobs still refer to it
    session.flush()
    for key in model_files(row).values():
        if key:
            services.blobs.delete(key)
    services.model_cache.forget(model_id)
    return Response(status_code=204)


# --- download -----------------------------------------------------------------------------------------


def _download_url(blobs: BlobStore, model_id: str, name: str, key: str) -> DownloadOut:
    url = blobs.url_for(key, URL_EXPIRES_SECONDS)
    if url is None:
        return DownloadOut(name=name, url=f"/v1/models/{model_id}/files/{name}?redirect=false")
    return DownloadOut(name=name, url=url, expires_seconds=URL_EXPIRES_SECONDS)


@router.get("/models/{model_id}/download", response_model=list[DownloadOut], summary="Download links")
def download_links(
    model_id: str,
    session: ReadSession,
    services: ServicesDep,
    caller: CurrentCaller,
) -> Any:
    """Presigned S3 URLs (no auth header needed), or API paths that stream the file (local storage)."""
    row = owned_model(session, caller, model_id)
    return [
        _download_url(services.blobs, model_id, name, key)
        for name, key in model_files(row).items()
        if key is not None
    ]


@router.get("/models/{model_id}/files/{name}", summary="Download one file of a model")
def download_file(
    model_id: str,
    name: str,
    session: ReadSession,
    services: ServicesDep,
    caller: CurrentCaller,
    redirect: bool = Query(True, description="on S3: 307 to a presigned URL (false: stream it)"),
) -> Response:
    row = owned_model(session, caller, model_id)
    key = model_files(row).get(name)
    if key is None:
        raise not_found("file", f"{model_id}/{name}")
    if redirect:
        url = services.blobs.url_for(key, URL_EXPIRES_SECONDS)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    return stream_blob(services.blobs, key, name, CONTENT_TYPES.get(name, BINARY))
