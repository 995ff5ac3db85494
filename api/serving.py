"""Serving models for /v1/upscale: a bounded inference pool (back-pressure instead of pile-up), an LRU of
loaded models bounded by their tensor bytes, and a background tuner that moves each model to its fastest
path within 0.05 dB of fp32 (core.infer.tuning). Routes call `load_cached_model` and `upscale_image`."""

from __future__ import annotations

import io
import logging
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from torch import nn

from api.crud import materialize_model
from api.errors import ApiError
from core.data.images import is_16bit, normalise_format
from core.errors import UserError
from core.formats import FORMATS
from core.infer.runners import Runner
from core.infer.tuning import cached_backend, choose_backend, prepare_backend
from core.infer.upscale import upscale_file
from core.models.checkpoint import load_checkpoint
from core.quantize.runtimes import format_runner_for
from store.models import model_files
from store.tables import Model

if TYPE_CHECKING:
    from api.deps import Services

log = logging.getLogger("srcompress.api")

REDUCED_PRECISION = ("bf16", "fp16")  # PyTorch paths admitted within 0.05 dB on 8-bit output only


def backend_precision(backend: str) -> str:
    """The arithmetic precision of a serving path: a PyTorch backend or an exported format."""
    if backend in FORMATS:
        return FORMATS[backend].precision
    return backend if backend in REDUCED_PRECISION else "fp32"


class UpscalePool:
    """A fixed number of inference threads and a bounded number of admitted requests."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.capacity = concurrency + queue
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upscale")
        self._lock = threading.Lock()
        self.admitted = 0

    def try_admit(self) -> bool:
        with self._lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def done(self) -> None:
        with self._lock:
            self.admitted -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


CacheKey = tuple[str, str | None]  # (model id, preset it was loaded into)


@dataclass
class ServedModel:
    """A loaded model and the runner that serves it. `runner` and `backend` change (one assignment
    each, safe for requests in flight) when the background measurement finds a faster path."""

    model: nn.Module
    runner: Runner
    backend: str
    # Runners of the model's offered formats, by name; `automatic` names those whose recorded quality
    # cost is within the threshold (candidates of the tuner), the others serve only when asked for.
    formats: dict[str, Runner] = field(default_factory=dict)
    automatic: tuple[str, ...] = ()
    latency_ms: dict[str, float] = field(default_factory=dict)

    def candidates(self) -> dict[str, Runner]:
        return {name: self.formats[name] for name in self.automatic}

    def fastest(self, precision: str) -> str | None:
        """The offered format of `precision` with the lowest recorded latency, if the model has one."""
        names = [name for name in self.formats if FORMATS[name].precision == precision]
        return min(names, key=lambda name: self.latency_ms.get(name, float("inf")), default=None)


class ModelCache:
    """LRU of loaded models keyed by (model id, preset), bounded by the models' tensor bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._models: OrderedDict[CacheKey, tuple[ServedModel, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def get(self, key: CacheKey) -> ServedModel | None:
        with self._lock:
            entry = self._models.get(key)
            if entry is None:
                return None
            self._models.move_to_end(key)
            return entry[0]

    def put(self, key: CacheKey, served: ServedModel) -> None:
        size = model_bytes(served.model)
        with self._lock:
            self._models[key] = (served, size)
            self._models.move_to_end(key)
            # Evict least recently used; a model larger than the budget is used once and not kept.
            while self._models and self.used_bytes > self.budget:
                self._models.popitem(last=False)

    def forget(self, model_id: str) -> None:
        with self._lock:
            for key in [key for key in self._models if key[0] == model_id]:
                del self._models[key]


class BackendTuner:
    """Measures newly loaded models' fastest exact path, one model at a time, off the request path."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backend-tuner")
        self._pending: set[CacheKey] = set()
        self._lock = threading.Lock()

    def submit(self, key: CacheKey, served: ServedModel) -> None:
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        self.executor.submit(self._tune, key, served)

    def _tune(self, key: CacheKey, served: ServedModel) -> None:
        try:
            candidates = served.candidates()
            name = choose_backend(served.model, self.cache_dir, formats=candidates)
            if name != served.backend:
                served.runner = prepare_backend(served.model, name, self.cache_dir, candidates)
                served.backend = name
            log.info("model %s is served with %s", key[0], name)
        except Exception:  # the model keeps being served eagerly
            log.exception("could not measure the inference backends of model %s", key[0])
        finally:
            with self._lock:
                self._pending.discard(key)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def serve_model(services: Services, key: CacheKey, served: ServedModel) -> ServedModel:
    """Give a freshly loaded model (served eagerly) its runner per the ``upscale_backend`` setting."""
    tuner = services.backend_tuner
    wanted = services.settings.upscale_backend
    candidates = served.candidates()
    if wanted == "auto":
        known = cached_backend(served.model, tuner.cache_dir, candidates)
        if known is None:
            tuner.submit(key, served)
            return served
        wanted = known
    try:
        served.runner = prepare_backend(served.model, wanted, tuner.cache_dir, candidates)
        served.backend = wanted
    except UserError as error:  # e.g. fp16 configured but no GPU, or a SwinIR model
        log.warning("model %s cannot use %s (%s); serving it eagerly", key[0], wanted, error)
    return served


def format_runners(
    services: Services, row: Model, model: nn.Module, directory: Path, threshold_db: float
) -> tuple[dict[str, Runner], tuple[str, ...], dict[str, float]]:
    """Runners of the offered formats a request can reach, the names admitted automatically (quality
    cost within `threshold_db`: the tuner's candidates) and their recorded latencies. Reachable are
    the admitted formats and the fastest int8 one (precision=int8); the others are not downloaded,
    and fp32 ONNX is left to the tuner, which exports its own."""
    offered = {
        entry["name"]: entry
        for entry in row.formats or []
        if entry.get("ok") and entry.get("name") in FORMATS and entry["name"] != "onnx"
    }
    latency = {name: entry.get("latency_ms") or float("inf") for name, entry in offered.items()}
    admitted = [
        name
        for name, entry in offered.items()
        if entry.get("quality_cost_db") is not None and entry["quality_cost_db"] <= threshold_db
    ]
    int8 = sorted((name for name in offered if FORMATS[name].precision == "int8"), key=latency.__getitem__)
    runners: dict[str, Runner] = {}

    def load(name: str) -> bool:
        try:
            for file in offered[name]["files"]:
                services.blobs.download_to(model_files(row)[file], directory / file)
            runners[name] = format_runner_for(model, name, directory)
            return True
        except Exception:  # a format that cannot load here is not served; the others still are
            log.exception("model %s: format %s cannot be loaded", row.id, name)
            return False

    for name in admitted:
        load(name)
    for name in int8:  # precision=int8 is served by the fastest int8 format that loads
        if name in runners or load(name):
            break
    automatic = tuple(name for name in admitted if name in runners)
    return runners, automatic, {name: latency[name] for name in runners}


def load_cached_model(services: Services, row: Model, preset: str | None) -> ServedModel:
    cache = services.model_cache
    key = (row.id, preset)
    served = cache.get(key)
    if served is not None:
        return served
    with tempfile.TemporaryDirectory(prefix="srcompress-model-") as tmp:
        directory = materialize_model(services.blobs, row, Path(tmp))
        if preset is None:
            model, _info = load_checkpoint(directory)
        else:
            model, _info = load_checkpoint(directory / "model.safetensors", preset=preset)
        # The runtimes read their files into memory: the temporary copies can go with the folder.
        runners, automatic, latency = (
            format_runners(services, row, model, directory, services.settings.upscale_max_quality_cost_db)
            if preset is None
            else ({}, (), {})
        )
    model = model.eval()
    served = ServedModel(model, prepare_backend(model, "eager"), "eager", runners, automatic, latency)
    served = serve_model(services, key, served)
    cache.put(key, served)
    return served


def check_pixels(data: bytes, max_pixels: int) -> None:
    """413 from the image header alone, before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # over Pillow's own guard: far over ours too
        raise ApiError(
            413,
            "image_too_large",
            f"the image is over the {max_pixels:,}-pixel limit",
            {"limit_pixels": max_pixels},
        ) from None
    except Exception:
        return  # not decodable here: read_image gives the precise 422
    if width * height > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"the image is {width}x{height} = {width * height:,} pixels, over the {max_pixels:,}-pixel limit",
            {"width": width, "height": height, "limit_pixels": max_pixels},
        )


def header_format(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:
        return None  # upscale_file's decoder reports the precise error


def upscale_image(
    services: Services,
    row: Model,
    preset: str | None,
    data: bytes,
    fmt: str,
    tile: int | None,
    precision: str = "auto",
) -> tuple[bytes, str, str, str]:
    """Encoded output, its format, the path that made it and that path's precision.

    precision: auto (the tuned path), fp32 (the exact eager path) or int8 (the model's fastest int8
    format, whatever its quality cost). On auto, a 16-bit image is served on the exact fp32 path when
    the tuned path is reduced precision (parity is measured on 8-bit output)."""
    settings = services.settings
    served = load_cached_model(services, row, preset)
    runner, backend = served.runner, served.backend  # one consistent pair, even if the tuner swaps them
    if precision == "int8":
        name = served.fastest("int8")
        if name is None:
            raise ApiError(
                422,
                "no_int8_format",
                f"model {row.id} has no int8 format; build one with a job's formats "
                "(onnx_int8, openvino_int8) or `srcompress quantize`",
            )
        runner, backend = served.formats[name], name
    elif precision == "fp32" or (backend_precision(backend) != "fp32" and is_16bit(data)):
        runner, backend = prepare_backend(served.model, "eager"), "eager"
    # The output format is decided here (from the header) so that the content type matches it.
    output_format = normalise_format(fmt, header_format(data))
    encoded: Any = upscale_file(
        served.model, data, None, tile=tile, backend=runner, fmt=output_format, max_pixels=settings.max_pixels
    )
    return bytes(encoded), output_format, backend, backend_precision(backend)
