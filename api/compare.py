"""Before/after crops for the dashboard: the same region of a job's held-out image as bicubic, teacher,
student and ground truth, rendered from the stored models on request (and kept in a small LRU).

The held-out images are the training images the job kept out of training to choose its checkpoint
(``report.holdout.images``), read from the job's training datasets. The crop is the centre of the
image, ``CROP_HR`` pixels wide at most; the models see ``CONTEXT_LR`` more LR pixels on each side, cut
off afterwards, so the crop has no border effects the full image would not have.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.serving import load_cached_model
from core.data.datasets import bicubic_upscale
from core.data.images import load_rgb_uint8
from core.data.imresize import downscale, mod_crop
from core.infer.upscale import upscale_array
from store.blobs import BlobNotFound
from store.tables import Dataset, Job, Model

if TYPE_CHECKING:
    from api.deps import Services

VIEWS = ("bicubic", "teacher", "student", "gt")
CROP_HR = 128
CONTEXT_LR = 8
SAMPLE_DATASET_ID = "sample"
CACHED_IMAGES = 32


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(rgb01: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(rgb01, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def holdout_images(job: Job) -> list[str]:
    """Names of the job's held-out images (409 until the job has a report)."""
    if job.report is None:
        raise ApiError(409, "not_ready", f"job {job.id} is {job.state}; crops exist once it has succeeded")
    return list((job.report.get("holdout") or {}).get("images") or [])


def read_holdout_image(services: Services, session: Session, job: Job, name: str) -> bytes:
    """The bytes of held-out image ``name`` from the job's training datasets."""
    config = job.config or {}
    for dataset_id in config.get("train_dataset_ids") or job.dataset_ids or []:
        if dataset_id == SAMPLE_DATASET_ID:
            from core.data.sample import sample_dir

            path = sample_dir(services.settings.data_dir / "cache") / name
            if path.is_file():
                return path.read_bytes()
            continue
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.deleted_at is not None:
            continue
        try:
            return services.blobs.get_bytes(dataset.blob_prefix + name)
        except BlobNotFound:
            continue
    raise ApiError(404, "not_found", f"held-out image {name} is no longer stored (its dataset was deleted)")


def render_views(
    services: Services, teacher: Model | None, student: Model, image: bytes, scale: int
) -> dict[str, bytes]:
    """PNG crops of every view (teacher left out when its model was deleted)."""
    hr = mod_crop(load_rgb_uint8(image, services.settings.max_pixels), scale)
    lr = downscale(hr, scale)
    height, width = lr.shape[:2]
    side_h, side_w = min(CROP_HR // scale, height), min(CROP_HR // scale, width)
    top, left = (height - side_h) // 2, (width - side_w) // 2
    top0, left0 = max(top - CONTEXT_LR, 0), max(left - CONTEXT_LR, 0)
    patch = lr[top0 : min(top + side_h + CONTEXT_LR, height), left0 : min(left + side_w + CONTEXT_LR, width)]

    def cut(sr: np.ndarray) -> np.ndarray:
        y, x = (top - top0) * scale, (left - left0) * scale
        return sr[y : y + side_h * scale, x : x + side_w * scale]

    views = {
        "bicubic": cut(to_uint8(bicubic_upscale(patch, scale))),
        "gt": hr[top * scale : (top + side_h) * scale, left * scale : (left + side_w) * scale],
    }
    for name, row in (("teacher", teacher), ("student", student)):
        if row is None:
            continue
        served = load_cached_model(services, row, None)
        sr = upscale_array(served.model, patch.astype(np.float32) / 255.0, backend=served.runner)
        views[name] = cut(to_uint8(sr))
    return {name: png(views[name]) for name in VIEWS if name in views}


class CropCache:
    """The rendered views of the last ``CACHED_IMAGES`` (job, image) pairs: the slider asks for four
    views of one image in a row, and they are rendered together."""

    def __init__(self, size: int = CACHED_IMAGES) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, int], dict[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> dict[str, bytes] | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: tuple[str, int], views: dict[str, bytes]) -> None:
        with self._lock:
            self._items[key] = views
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def job_views(services: Services, cache: CropCache, session: Session, job: Job, index: int) -> dict[str, Any]:
    """Every view of held-out image ``index`` of ``job`` (rendered once, then cached)."""
    names = holdout_images(job)
    if not 0 <= index < len(names):
        raise ApiError(404, "not_found", f"job {job.id} has {len(names)} held-out image(s); no #{index}")
    cached = cache.get((job.id, index))
    if cached is not None:
        return cached
    student = session.get(Model, job.result_model_id) if job.result_model_id else None
    if student is None:
        raise ApiError(409, "not_ready", f"job {job.id} has no student model")
    teacher = session.get(Model, job.teacher_model_id) if job.teacher_model_id else None
    if teacher is not None and teacher.deleted_at is not None:
        teacher = None
    image = read_holdout_image(services, session, job, names[index])
    views = render_views(services, teacher, student, image, student.scale)
    cache.put((job.id, index), views)
    return views
