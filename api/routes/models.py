"""Models: presets, checkpoint upload (validated by loading it with weights_only), list/show/delete and
download as safetensors + config (+ ONNX): a presigned URL on S3, a stream from the local backend."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from torch import nn

from api.deps import Caller, Offset, Services, current_caller, get_services, read_session
from api.errors import ApiError, error_responses, not_found
from api.schemas import DownloadOut, ModelOut, Page, PresetOut, model_files
from api.uploads import save_upload
from core import __version__
from core.models import PRESETS, SCALES, build_model, load_checkpoint, preset_config, save_model
from store.blobs import BlobNotFound, BlobStore, join_key
from store.jobs import ACTIVE_STATES
from store.tables import Job, Model, new_id, utcnow

router = APIRouter(
    prefix="/v1", tags=["models"], responses=error_responses(400, 401, 404, 409, 413, 422, 503)
)

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
CONTENT_TYPES = {
    "model.safetensors": "application/octet-stream",
    "config.json": "application/json",
    "model.onnx": "application/octet-stream",
}
URL_EXPIRES_SECONDS = 3600


# --- presets ------------------------------------------------------------------------------------------


def compute_preset(name: str, scale: int) -> PresetOut:
    """A preset's params and MACs at the default LR size, counted on shapes only (no weights)."""
    import torch

    from core.complexity import count_macs, count_params, default_lr_size

    with torch.device("meta"):
        model = build_model(preset_config(name, scale))
    lr_size = default_lr_size(scale)
    macs = count_macs(model, lr_size).macs
    return PresetOut(
        name=name,
        family=PRESETS[name]["family"],
        scale=scale,
        params=count_params(model).total,
        macs=macs,
        gmacs=round(macs / 1e9, 3),
        lr_size=lr_size,
    )


class PresetTable:
    """Preset figures, computed on first request (SwinIR's MAC count takes seconds) and kept in a JSON
    file under ``<data_dir>/cache`` so that restarts and other API processes reuse them."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_file = cache_dir / f"presets-{__version__}.json"
        cache_file = self.cache_file
        self._lock = threading.Lock()
        self._rows: dict[str, PresetOut] = {}
        try:
            for item in json.loads(cache_file.read_text()):
                row = PresetOut.model_validate(item)
                self._rows[f"{row.name}x{row.scale}"] = row
        except (OSError, ValueError):
            pass

    def get(self, names: list[str], scales: list[int]) -> list[PresetOut]:
        with self._lock:
            missing = [(n, s) for n in names for s in scales if f"{n}x{s}" not in self._rows]
            for name, scale in missing:
                self._rows[f"{name}x{scale}"] = compute_preset(name, scale)
            if missing:
                self._save()
            return [self._rows[f"{n}x{s}"] for n in names for s in scales]

    def _save(self) -> None:
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps([row.model_dump(mode="json") for row in self._rows.values()]))
            tmp.replace(self.cache_file)
        except OSError:
            pass  # a cache only


@router.get("/presets", response_model=list[PresetOut], summary="Model presets with params and MACs")
def list_presets(
    name: str | None = Query(None, description="only this preset"),
    scale: int | None = Query(None, description="only this scale (2, 3 or 4)"),
    services: Services = Depends(get_services),
    _caller: Caller = Depends(current_caller),
) -> Any:
    """Params and MACs (at the default LR size, 640x360 for x2) of every preset at every scale."""
    if name is not None and name not in PRESETS:
        raise ApiError(
            422, "invalid_request", f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        )
    if scale is not None and scale not in SCALES:
        raise ApiError(422, "invalid_request", f"scale must be one of {', '.join(map(str, SCALES))}")
    table: PresetTable = services.extras["presets"]
    return table.get([name] if name else list(PRESETS), [scale] if scale else list(SCALES))


# --- helpers ------------------------------------------------------------------------------------------


def owned_model(session: Session, caller: Caller, model_id: str) -> Model:
    """The caller's live model, else 404 (also for other keys' models: ids are not probeable)."""
    row = session.get(Model, model_id)
    if row is None or row.deleted_at is not None or row.owner_key_id not in (caller.key_id, None):
        raise not_found("model", model_id)
    return row


def model_in_use(session: Session, model_id: str) -> bool:
    stmt = (
        select(func.count())
        .select_from(Job)
        .where(Job.teacher_model_id == model_id, Job.state.in_(ACTIVE_STATES))
    )
    return bool(session.execute(stmt).scalar_one())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def store_model_files(blobs: BlobStore, model_id: str, model_dir: Path) -> dict[str, str]:
    """Upload a save_model directory; returns the blob keys (weights, config)."""
    keys = {
        "weights_key": join_key("models", model_id, "model.safetensors"),
        "config_key": join_key("models", model_id, "config.json"),
    }
    blobs.put_file(keys["weights_key"], model_dir / "model.safetensors", "application/octet-stream")
    blobs.put_file(keys["config_key"], model_dir / "config.json", "application/json")
    return keys


def complexity_of(model: nn.Module) -> tuple[int, int]:
    from core.complexity import count_macs, count_params

    return count_params(model).total, count_macs(model).macs


# --- upload -------------------------------------------------------------------------------------------


@router.post("/models", status_code=201, response_model=ModelOut, summary="Upload a checkpoint")
def upload_model(
    file: UploadFile = File(
        description=".pth/.pt (state_dict, optionally under params/params_ema) or .safetensors"
    ),
    name: str | None = Form(None, max_length=200),
    family: str | None = Form(None, description="edsr | swinir | rlfn; detected when omitted"),
    scale: int | None = Form(None, description="2 | 3 | 4; detected when omitted"),
    preset: str | None = Form(None, description="a preset whose hyper-parameters the checkpoint has"),
    services: Services = Depends(get_services),
    caller: Caller = Depends(current_caller),
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
        keys = store_model_files(services.blobs, model_id, model_dir)
        sha = file_sha256(model_dir / "model.safetensors")
    config = info.config.model_dump(mode="json")
    row = Model(
        id=model_id,
        owner_key_id=caller.key_id,
        name=name or Path(filename).stem,
        family=config["family"],
        scale=config["scale"],
        config=config,
        source="upload",
        params=params,
        macs=macs,
        metrics={"load_notes": info.notes, "original_filename": filename},
        weights_sha256=sha,
        created_at=utcnow(),
        **keys,
    )
    try:
        with services.sessions.begin() as session:
            session.add(row)
    except Exception:
        for key in keys.values():
            services.blobs.delete(key)
        raise
    return ModelOut.of(row)


# --- list / show / delete -------------------------------------------------------------------------------


@router.get("/models", response_model=Page[ModelOut], summary="The caller's models")
def list_models(
    limit: int = Query(50, ge=1, le=200),
    offset: Offset = 0,
    source: str | None = Query(None, pattern="^(upload|job|builtin)$"),
    session: Session = Depends(read_session),
    caller: Caller = Depends(current_caller),
) -> Any:
    where = [Model.owner_key_id == caller.key_id, Model.deleted_at.is_(None)]
    if source:
        where.append(Model.source == source)
    return Page[ModelOut].of_rows(session, Model, where, ModelOut.of, limit, offset)


@router.get("/models/{model_id}", response_model=ModelOut, summary="One model")
def show_model(
    model_id: str, session: Session = Depends(read_session), caller: Caller = Depends(current_caller)
) -> Any:
    return ModelOut.of(owned_model(session, caller, model_id))


@router.delete("/models/{model_id}", status_code=204, summary="Delete a model (409 while a live job uses it)")
def delete_model(
    model_id: str,
    services: Services = Depends(get_services),
    caller: Caller = Depends(current_caller),
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
    cache = services.extras.get("model_cache")
    if cache is not None:
        cache.forget(model_id)
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
    session: Session = Depends(read_session),
    services: Services = Depends(get_services),
    caller: Caller = Depends(current_caller),
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
    redirect: bool = Query(True, description="on S3: 307 to a presigned URL (false: stream it)"),
    session: Session = Depends(read_session),
    services: Services = Depends(get_services),
    caller: Caller = Depends(current_caller),
) -> Response:
    row = owned_model(session, caller, model_id)
    key = model_files(row).get(name)
    if key is None:
        raise not_found("file", f"{model_id}/{name}")
    if redirect:
        url = services.blobs.url_for(key, URL_EXPIRES_SECONDS)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    return stream_blob(services.blobs, key, name, CONTENT_TYPES.get(name, "application/octet-stream"))


def stream_blob(blobs: BlobStore, key: str, filename: str, content_type: str) -> StreamingResponse:
    try:
        size = blobs.size(key)
        stream = blobs.open_stream(key)
    except BlobNotFound:
        raise ApiError(404, "not_found", f"file {filename} is missing from storage") from None

    def chunks() -> Any:
        with stream:
            yield from iter(lambda: stream.read(1 << 20), b"")

    headers = {"Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(size)}
    return StreamingResponse(chunks(), media_type=content_type, headers=headers)


def materialize_model(blobs: BlobStore, row: Model, directory: Path) -> Path:
    """Download a model's safetensors + config into ``directory`` (a srcompress model dir)."""
    if not row.weights_key or not row.config_key:
        raise ApiError(409, "model_incomplete", f"model {row.id} has no stored weights")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        blobs.download_to(row.weights_key, directory / "model.safetensors")
        blobs.download_to(row.config_key, directory / "config.json")
    except BlobNotFound:
        raise ApiError(409, "model_incomplete", f"model {row.id}'s files are missing from storage") from None
    return directory


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
