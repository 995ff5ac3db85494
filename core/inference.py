"""Fast, tiled upscaling with any srcompress model, and the file-to-file `upscale_file` (method.md §9).

Tiling. The LR image is cut into tiles whose sides are multiples of 8 (SwinIR's window, so a tile is
never padded) that overlap by `overlap` LR pixels. Each tile's output is weighted by a feathered mask
that is ~0 near an edge shared with a neighbour and rises linearly to 1 across the overlap (image
borders keep weight 1), and the weighted sum is divided by the summed weights: no seams (crop-and-paste
leaves them, xinntao/Real-ESRGAN#211). SwinIR inputs are reflect-padded once, for the whole image, to a
multiple of 8 (only when needed) and the output cropped, so tiles and whole-image passes see the same
border. The image and the output accumulator live in host memory, so only one tile's
activations are ever on the device (Real-ESRGAN#184). With `tile=None` the tile is sized from free
memory (the whole image when it fits) and halved on out-of-memory errors.

Backends (all take and return float32 RGB in [0, 1]):
- 'eager': the model as is, fp32.
- 'channels_last': fp32 on a channels-last copy of the model (oneDNN's preferred conv layout on CPU).
- 'sdpa': fp32 on a copy of a SwinIR model whose window attention runs through torch's fused
  `scaled_dot_product_attention` (same math; the explicit matmul + bias + mask + softmax of the model
  file, kept there for FLOP counting, makes ~5 passes over the (windows, heads, 64, 64) scores).
- 'bf16': autocast to bfloat16; falls back to fp32 when the output is not finite.
- 'fp16': autocast to float16, CUDA only and never for SwinIR (its activations overflow fp16 into
  NaN/black output, JingyunLiang/SwinIR#103, #180).
- 'onnxruntime': the model exported by core.onnx_export, run by an ONNX Runtime CPU session with one
  intra-op thread per core; the graph is cached on disk per model fingerprint (and per LR tile shape
  for SwinIR, whose graph is size-specific: the first image of a new shape pays an export of several
  seconds; use a fixed `tile` when serving SwinIR through it).
Every backend but 'eager' runs a copy with the sub-pixel tail folded (core.models.fold: EDSR and
classical SwinIR compute conv_last on the LR side, before the final PixelShuffle; same outputs).
`choose_backend` measures which of them is fastest on this machine *and* keeps the Y-PSNR within
0.05 dB of fp32, once per model and machine (the decision is cached as JSON). `backend=None` means
'eager'; pass 'auto' (or `prepare_backend(model, "auto")`) to use the measured choice.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from core.models.fold import with_folded_tail
from core.training import cpu_has_fast_bf16

log = logging.getLogger(__name__)

BackendName = Literal["eager", "channels_last", "sdpa", "bf16", "fp16", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("eager", "channels_last", "sdpa", "bf16", "fp16", "onnxruntime")
ProgressFn = Callable[[int, int], None]  # (tiles done, tiles total)

TILE_MULTIPLE = 8  # SwinIR's window: a tile of this multiple is never padded inside the model
MAX_AUTO_TILE = 512  # largest tile `tile=None` picks when the image does not fit in one piece
MIN_TILE = 32  # out-of-memory retries stop halving here
CPU_BUDGET_CAP = 1 << 30  # at most 1 GiB of activations per tile on CPU (keeps a 4K upscale < 1.5 GB RSS)
LIVE_ACTIVATIONS = 4  # feature maps of the widest layer alive at once (input, output, residual, temp)
MAX_ORT_SESSIONS = 4  # ONNX Runtime sessions kept per runner (SwinIR graphs are per tile shape)
QUICK_PROBE_SECONDS = 0.15  # eager time on LR 128x128 under which backends are timed on …
QUICK_MODEL_TIMING_SIZE = (640, 360)  # … this LR (width, height)
PSNR_TOLERANCE_DB = 0.05  # a fast backend is accepted when its Y-PSNR is this close to fp32's
FEATHER_FLOOR = 1e-6  # smallest blending weight; the tile grid keeps every pixel's weight sum >= ~0.25
ONNX_GRAPH_VERSION = 2  # bump when the exported inference graph changes (2: folded sub-pixel tail)
DECISION_VERSION = 4  # bump when the decision procedure changes, so stale cached decisions are ignored


# ------------------------------------------------------------------------------------------ helpers


def model_scale(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    scale = getattr(config, "scale", None)
    if not isinstance(scale, int):
        raise UserError("the model has no config.scale; build it with core.models")
    return scale


def model_family(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "family", "unknown"))


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex) of the architecture config and every state_dict tensor: same weights, same key."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(
        config.model_dump_json().encode() if hasattr(config, "model_dump_json") else repr(config).encode()
    )
    digest.update(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """$SRCOMPRESS_CACHE, else ~/.cache/srcompress."""
    return Path(os.environ.get("SRCOMPRESS_CACHE", Path.home() / ".cache" / "srcompress"))


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/CPU allocator failures from torch, numpy or ONNX Runtime."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    markers = (
        "out of memory",
        "can't allocate memory",
        "cannot allocate memory",
        "failed to allocate",
        "bad_alloc",
    )
    return any(marker in text for marker in markers)


# ------------------------------------------------------------------------------------------ runners


def fused_window_attention(attention: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SwinIR WindowAttention.forward through `F.scaled_dot_product_attention` (same inputs and result).

    Every window gets the relative-position bias as a broadcast mask (no copy). The shift mask is
    non-zero only in the last row and column of windows, so only those windows are attended again
    with bias + mask, instead of materialising a (windows, heads, 64, 64) mask for all of them.
    """
    b_windows, n, c = x.shape
    heads = attention.num_heads
    qkv = attention.qkv(x).reshape(b_windows, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    table = attention.relative_position_bias_table
    bias = table[attention.relative_position_index.view(-1)].view(n, n, heads).permute(2, 0, 1)
    bias = bias.unsqueeze(0).to(q.dtype)  # (1, heads, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attention.scale)
    if mask is not None:
        n_windows = mask.shape[0]
        masked = mask.ne(0).flatten(1).any(1).nonzero().squeeze(1)  # windows that straddle regions
        if masked.numel():
            images = b_windows // n_windows
            offsets = n_windows * torch.arange(images, device=x.device)
            rows = (masked[None, :] + offsets[:, None]).flatten()
            window_mask = bias + mask[masked].to(q.dtype).unsqueeze(1).repeat(images, 1, 1, 1)
            out[rows] = F.scaled_dot_product_attention(
                q[rows], k[rows], v[rows], attn_mask=window_mask, scale=attention.scale
            )
    return attention.proj(out.transpose(1, 2).reshape(b_windows, n, c))


def with_fused_attention(model: nn.Module) -> nn.Module:
    """A copy of `model` whose SwinIR window attentions use `fused_window_attention`."""
    from core.models.swinir import WindowAttention

    fused = copy.deepcopy(model)
    for module in fused.modules():
        if isinstance(module, WindowAttention):
            module.forward = types.MethodType(fused_window_attention, module)
    return fused


class TorchRunner:
    """Runs a PyTorch model on one LR batch: fp32 eager, channels-last, or autocast bf16/fp16."""

    def __init__(self, model: nn.Module, backend: str):
        if backend not in ("eager", "channels_last", "sdpa", "bf16", "fp16"):
            raise ValueError(f"TorchRunner does not run backend {backend!r}")
        self.name = backend
        self.device = model_device(model)
        if backend == "fp16" and model_family(model) == "swinir":
            raise UserError(
                "fp16 is never used for SwinIR: its activations overflow to NaN (use bf16 or fp32)"
            )
        if backend == "fp16" and self.device.type != "cuda":
            raise UserError("fp16 inference needs a CUDA model; on CPU use 'bf16' or 'onnxruntime'")
        if backend != "eager":
            model = with_folded_tail(model)  # a copy, or the model itself when there is nothing to fold
        if backend == "channels_last":
            # A copy, so that the caller's model keeps its own memory format.
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if backend == "sdpa":
            model = with_fused_attention(model)  # a copy; a model without window attention is unchanged
        self.model = model
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(backend)
        self.fell_back = False  # set once a low-precision output was not finite; then fp32 for good

    def _forward(self, x: torch.Tensor, low_precision: bool) -> torch.Tensor:
        if low_precision:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.model(x).float()
        return self.model(x).float()

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model), torch.inference_mode():
            x = lr.to(self.device, dtype=torch.float32)
            if self.name == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            low_precision = self.autocast_dtype is not None and not self.fell_back
            y = self._forward(x, low_precision)
            if low_precision and not bool(torch.isfinite(y).all()):
                log.warning("%s output was not finite; falling back to fp32 for this model", self.name)
                self.fell_back = True
                y = self._forward(x, low_precision=False)
            return y.cpu().contiguous()


class OnnxRuntimeRunner:
    """Runs the model's ONNX export with ONNX Runtime; graphs cached on disk, sessions per shape in memory.

    The graph is exported from the model's weights when the runner first needs it (keyed by the
    fingerprint taken at construction): build a new runner after changing the weights.
    """

    name = "onnxruntime"

    def __init__(self, model: nn.Module, cache_dir: str | Path | None = None):
        from core.onnx_export import supports_dynamic_shapes

        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.fingerprint = model_fingerprint(model)  # of the caller's model: the cache key
        self.model = with_folded_tail(model)  # what is exported
        self.dynamic = supports_dynamic_shapes(model)
        self.sessions: dict[str, object] = {}
        self._lock = threading.Lock()  # one export per graph when several threads share this runner

    def graph_path(self, width: int, height: int) -> Path:
        shape = "dynamic" if self.dynamic else f"{width}x{height}"
        return self.cache_dir / "onnx" / f"{self.fingerprint}-{shape}-v{ONNX_GRAPH_VERSION}.onnx"

    def session_for(self, width: int, height: int):
        from core.onnx_export import export_onnx, ort_session

        path = self.graph_path(width, height)
        key = path.name
        with self._lock:
            if key not in self.sessions:
                if not path.is_file():
                    export_onnx(self.model, path, example_lr_size=(width, height), dynamic=self.dynamic)
                while len(self.sessions) >= MAX_ORT_SESSIONS:  # SwinIR: one per shape; keep the newest few
                    self.sessions.pop(next(iter(self.sessions)))
                self.sessions[key] = ort_session(path)
            return self.sessions[key]

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        session = self.session_for(width=lr.shape[3], height=lr.shape[2])
        x = np.ascontiguousarray(lr.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {"lr": x})[0])


class Runner(Protocol):
    """Anything that maps an LR batch (N, 3, H, W) float32 in [0, 1] to its SR batch on the CPU."""

    name: str

    def __call__(self, lr: torch.Tensor) -> torch.Tensor: ...


def prepare_backend(
    model: nn.Module, backend: str | None = "eager", cache_dir: str | Path | None = None
) -> Runner:
    """A reusable runner for `backend` ('auto' runs `choose_backend`). Reuse it across images to keep
    ONNX Runtime sessions and channels-last copies warm."""
    name = backend or "eager"
    if name == "auto":
        name = choose_backend(model, cache_dir)
    if name == "onnxruntime":
        return OnnxRuntimeRunner(model, cache_dir)
    if name in BACKENDS:
        return TorchRunner(model, name)
    raise UserError(f"unknown backend {backend!r}; use auto or one of {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------------------ tiling


@dataclass(frozen=True)
class Tile:
    """An LR window: top-left (y, x) and size (height, width)."""

    y: int
    x: int
    height: int
    width: int


def axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: the fewest tiles that overlap by >= `overlap`, spread evenly."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - overlap) / stride)
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles covering an LR image of height x width; a side shorter than `tile` is one piece."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        Tile(y, x, tile_h, tile_w)
        for y in axis_starts(height, tile, overlap)
        for x in axis_starts(width, tile, overlap)
    ]


def feather_ramp(length: int, ramp: int, rise: bool, fall: bool) -> np.ndarray:
    """1-D blending weights over `length` output samples, tapered where a neighbour overlaps.

    Over the `ramp` samples at a shared edge the weight is ~0 for the outer quarter (where the tile
    saw zero padding instead of real context), rises linearly over the middle half, and is 1 for the
    inner quarter and beyond. Compared with a plain linear ramp this lifts tiled-vs-whole agreement
    of random-weight SwinIR from 54 to 68 dB (64 px tiles, overlap 32).
    """
    weights = np.ones(length, dtype=np.float32)
    ramp = min(ramp, length)
    if ramp > 0:
        margin = ramp // 4
        rising = (np.arange(ramp, dtype=np.float32) - margin + 0.5) / max(ramp - 2 * margin, 1)
        edge = np.clip(rising, FEATHER_FLOOR, 1.0)
        if rise:
            weights[:ramp] = np.minimum(weights[:ramp], edge)
        if fall:
            weights[length - ramp :] = np.minimum(weights[length - ramp :], edge[::-1])
    return weights


def tile_weights(tile: Tile, height: int, width: int, scale: int, overlap: int) -> np.ndarray:
    """(tile.height·s, tile.width·s) blending weights: feathered on sides shared with another tile."""
    ramp = overlap * scale
    rows = feather_ramp(tile.height * scale, ramp, rise=tile.y > 0, fall=tile.y + tile.height < height)
    cols = feather_ramp(tile.width * scale, ramp, rise=tile.x > 0, fall=tile.x + tile.width < width)
    return np.outer(rows, cols)


def padding_multiple(model: nn.Module) -> int:
    """The multiple the LR image is reflect-padded to: SwinIR's window size, 1 for the conv nets."""
    if model_family(model) == "swinir":
        return int(model.config.window_size)
    return 1


def _validate_rgb(rgb: np.ndarray) -> np.ndarray:
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UserError(f"expected an HxWx3 RGB image, got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise UserError(f"empty image of shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _run_tile(runner: Runner, rgb: np.ndarray, tile: Tile, scale: int) -> np.ndarray:
    patch = rgb[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]
    lr = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))[None]
    sr = runner(lr)
    expected = (1, 3, tile.height * scale, tile.width * scale)
    if tuple(sr.shape) != expected:
        raise RuntimeError(f"model returned {tuple(sr.shape)} for a tile, expected {expected}")
    return sr[0].numpy().transpose(1, 2, 0)


def upscale_tiled(
    runner: Runner,
    rgb: np.ndarray,
    scale: int,
    tile: int,
    overlap: int,
    on_progress: ProgressFn | None = None,
) -> np.ndarray:
    """One pass over the tiles of `plan_tiles` with feathered blending (no OOM handling here)."""
    height, width = rgb.shape[:2]
    tiles = plan_tiles(height, width, tile, overlap)
    if len(tiles) == 1:
        out = _run_tile(runner, rgb, tiles[0], scale)
        if on_progress is not None:
            on_progress(1, 1)
        return out
    out = np.zeros((height * scale, width * scale, 3), dtype=np.float32)
    weight_sum = np.zeros((height * scale, width * scale), dtype=np.float32)
    weight_cache: dict[tuple[bool, bool, bool, bool, int, int], np.ndarray] = {}
    for done, t in enumerate(tiles, start=1):
        sr = _run_tile(runner, rgb, t, scale)
        key = (t.y > 0, t.x > 0, t.y + t.height < height, t.x + t.width < width, t.height, t.width)
        if key not in weight_cache:
            weight_cache[key] = tile_weights(t, height, width, scale, overlap)
        weights = weight_cache[key]
        rows = slice(t.y * scale, (t.y + t.height) * scale)
        cols = slice(t.x * scale, (t.x + t.width) * scale)
        out[rows, cols] += sr * weights[..., None]
        weight_sum[rows, cols] += weights
        if on_progress is not None:
            on_progress(done, len(tiles))
    out /= weight_sum[..., None]
    return out


def activation_bytes_per_lr_pixel(model: nn.Module) -> int:
    """Rough peak activation bytes per LR pixel: a few maps of the widest layer plus the output.

    Widest = most conv/linear output channels per LR pixel, or for SwinIR the attention matrix
    (heads x window² values per token) when that is wider.
    """
    widest = 3
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            widest = max(widest, module.out_channels)
        elif isinstance(module, nn.Linear):
            widest = max(widest, module.out_features)
    config = getattr(model, "config", None)
    if model_family(model) == "swinir":
        widest = max(widest, max(config.num_heads) * config.window_size**2)
    scale = model_scale(model)
    return 4 * (LIVE_ACTIVATIONS * widest + 2 * 3 * scale * scale)


def memory_budget(device: torch.device) -> int:
    """Bytes one tile's activations may take: half the free GPU memory, or a quarter of the available
    host memory (capped at CPU_BUDGET_CAP) on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    import psutil

    return int(min(psutil.virtual_memory().available * 0.25, CPU_BUDGET_CAP))


def auto_tile_size(model: nn.Module, height: int, width: int, budget_bytes: int | None = None) -> int:
    """LR tile side for `tile=None`: the whole image if it fits the memory budget, else the largest
    multiple of 8 that fits, between MIN_TILE and MAX_AUTO_TILE."""
    budget = memory_budget(model_device(model)) if budget_bytes is None else budget_bytes
    pixels = budget // activation_bytes_per_lr_pixel(model)
    if height * width <= pixels:
        return max(height, width)
    side = int(math.isqrt(max(pixels, 1)))
    return max(MIN_TILE, min(MAX_AUTO_TILE, side // TILE_MULTIPLE * TILE_MULTIPLE))


def _resolve_tile(tile: int | str | None) -> int | None:
    if tile is None or tile == "auto":
        return None
    if isinstance(tile, bool) or not isinstance(tile, int | np.integer):
        raise UserError(f"tile must be a positive integer or 'auto', got {tile!r}")
    if tile < TILE_MULTIPLE:
        raise UserError(f"tile must be at least {TILE_MULTIPLE} LR pixels, got {tile}")
    return int(tile) // TILE_MULTIPLE * TILE_MULTIPLE  # tiles are multiples of 8


def upscale_array(
    model: nn.Module,
    rgb: np.ndarray,
    *,
    tile: int | str | None = None,
    overlap: int = 32,
    backend: str | Runner | None = None,
    on_progress: ProgressFn | None = None,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """Upscale float32 RGB HxWx3 in [0, 1] to (sH)x(sW)x3 float32, clamped to [0, 1].

    tile: LR tile side (rounded down to a multiple of 8), or None/'auto' to size it from free memory
    (the whole image when it fits); an out-of-memory error retries at half the size down to 32.
    overlap: LR pixels shared by neighbouring tiles (at most half a tile). backend: a name from BACKENDS,
    'auto' (`choose_backend`), a runner from `prepare_backend`, or None for 'eager'.
    on_progress(i, n) is called after each tile ("tile i/n"); a retry restarts the count.
    """
    rgb = _validate_rgb(rgb)
    scale = model_scale(model)
    if overlap < 0:
        raise UserError(f"overlap must be >= 0, got {overlap}")
    requested_tile = _resolve_tile(tile)  # a bad tile fails before the (possibly slow) backend choice
    runner = (
        prepare_backend(model, backend, cache_dir) if backend is None or isinstance(backend, str) else backend
    )
    height, width = rgb.shape[:2]
    # SwinIR: reflect-pad the whole image once (only when needed) rather than each tile, so tiles see
    # the same border as a whole-image pass, and every tile is a window multiple (pitfall 8).
    multiple = padding_multiple(model)
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    padded = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect") if pad_h or pad_w else rgb
    size = requested_tile or auto_tile_size(model, *padded.shape[:2])
    while True:
        tile_overlap = min(overlap, size // 2 // TILE_MULTIPLE * TILE_MULTIPLE)
        try:
            out = upscale_tiled(runner, padded, scale, size, tile_overlap, on_progress)
            out = np.ascontiguousarray(out[: height * scale, : width * scale])
            return np.clip(out, 0.0, 1.0, out=out)
        except Exception as error:
            if not is_out_of_memory(error) or size <= MIN_TILE:
                raise
            smaller = max(MIN_TILE, size // 2 // TILE_MULTIPLE * TILE_MULTIPLE)
            log.warning("out of memory with %d px tiles; retrying with %d px", size, smaller)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = smaller


# ------------------------------------------------------------------------------------------ files


def _format_for(destination: str | Path | None, fmt: str | None, input_format: str) -> str:
    from core.data.images import normalise_format

    if fmt is not None:
        return normalise_format(fmt, input_format)
    if destination is not None and Path(destination).suffix:
        suffix = Path(destination).suffix.lower().lstrip(".")
        if suffix not in ("png", "jpg", "jpeg", "webp"):
            raise UserError(f"cannot write .{suffix}; use a .png, .jpg or .webp output (or pass fmt)")
        return normalise_format(suffix)
    return normalise_format("auto", input_format)


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upscale of an HxW alpha plane in [0, 1] (never the model, never bilinear; upscayl#881)."""
    import cv2

    height, width = alpha.shape
    resized = cv2.resize(
        alpha.astype(np.float32), (width * scale, height * scale), interpolation=cv2.INTER_CUBIC
    )
    return np.clip(resized, 0.0, 1.0)


def upscale_file(
    model: nn.Module,
    source: str | Path | bytes,
    destination: str | Path | None = None,
    *,
    tile: int | str | None = None,
    backend: str | Runner | None = None,
    fmt: str | None = None,
    on_progress: ProgressFn | None = None,
    overlap: int = 32,
    max_pixels: int | None = None,
    cache_dir: str | Path | None = None,
) -> bytes | Path:
    """Decode -> upscale -> encode. Returns the encoded bytes, or writes `destination` and returns it.

    Decoding applies the EXIF orientation and keeps 8/16-bit depth, gray and alpha; the output keeps the
    bit depth (16-bit only in PNG), gray stays gray (mean of the model's three channels), alpha is
    upscaled bicubically on its own and recombined, ICC/EXIF are kept with orientation 1. The format is
    `fmt` ('auto', 'png', 'jpg', 'webp'), else the destination's extension, else the input's format.
    """
    from core.data.images import DEFAULT_MAX_PIXELS, encode_image, read_image

    image = read_image(source, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    output_format = _format_for(destination, fmt, image.format)
    scale = model_scale(model)
    sr = upscale_array(
        model,
        image.rgb,
        tile=tile,
        overlap=overlap,
        backend=backend,
        on_progress=on_progress,
        cache_dir=cache_dir,
    )
    alpha = upscale_alpha(image.alpha, scale) if image.alpha is not None else None
    encoded = encode_image(
        sr,
        output_format,
        alpha=alpha,
        mode=image.mode,
        bit_depth=image.bit_depth,
        icc_profile=image.icc_profile,
        exif=image.exif,
    )
    if destination is None:
        return encoded
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(encoded)
    return destination


# ------------------------------------------------------------------------------------------ backend choice


@dataclass
class BackendTrial:
    """One candidate's measurements: latency on the timing input, Y-PSNR on the evaluation set."""

    backend: str
    seconds: float  # median latency on the timing input
    speedup: float  # eager seconds / these seconds
    psnr: float | None = None  # mean Y-PSNR (quantized output vs ground truth); None if not evaluated
    accepted: bool = False
    reason: str = ""


@dataclass
class BackendDecision:
    """What `choose_backend` decided and why; stored as JSON in the cache."""

    backend: str
    key: str
    model_fingerprint: str
    family: str
    eval_set: str
    psnr_fp32: float | None
    trials: list[BackendTrial] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    timing_lr_size: tuple[int, int] = (128, 128)  # (width, height) of the timing input
    version: int = DECISION_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def machine_signature() -> dict[str, str]:
    """What makes timings machine-specific: CPU model, threads, library versions, GPU if any."""
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def candidate_backends(model: nn.Module) -> list[str]:
    """Fast paths worth measuring for this model on its device (eager is the baseline, always allowed).

    fp16 only on CUDA and never for SwinIR; bf16 on CUDA or a CPU with native bf16; ONNX Runtime on CPU.
    """
    device = model_device(model)
    candidates = ["channels_last", "sdpa"] if model_family(model) == "swinir" else ["channels_last"]
    if device.type == "cuda":
        candidates.append("bf16")
        if model_family(model) != "swinir":
            candidates.append("fp16")
    else:
        if cpu_has_fast_bf16():
            candidates.append("bf16")
        candidates.append("onnxruntime")
    return candidates


def shared_eval_dir() -> Path | None:
    """Set5 from the shared data ($SRCOMPRESS_SHARED, else ../shared beside the repository), if present."""
    repo = Path(__file__).resolve().parents[1]
    shared = Path(os.environ.get("SRCOMPRESS_SHARED", repo.parent / "shared"))
    set5 = shared / "data" / "benchmark" / "Set5"
    return set5 if (set5 / "HR").is_dir() else None


def time_runners(runners: dict[str, Runner], lr: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Fastest of `repeats` calls per runner, after one warm-up call each (which also builds lazy state
    such as an ONNX export). Runners take turns in each round, and the minimum (not the median) is kept:
    other processes on a shared machine only ever add time, and a burst of load then hits every
    candidate alike instead of deciding the choice."""
    for runner in runners.values():
        runner(lr)
    best = dict.fromkeys(runners, math.inf)
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(lr)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def mean_psnr(
    model: nn.Module, runner: Runner, images: Iterable[tuple[str, np.ndarray, np.ndarray]]
) -> float:
    """Mean Y-PSNR (crop = scale, quantized SR vs uint8 HR) of `runner`'s whole-image outputs."""
    from core.metrics import psnr_y, quantize

    scale = model_scale(model)
    values = []
    for _name, hr, lr in images:
        sr = upscale_array(model, lr.astype(np.float32) / 255.0, tile=None, backend=runner)
        values.append(psnr_y(quantize(sr), hr[: sr.shape[0], : sr.shape[1]], scale))
    return float(np.mean(values))


def _eval_images(model: nn.Module, eval_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from core.data.datasets import load_eval_set

    return [(image.name, image.hr, image.lr) for image in load_eval_set(eval_dir, model_scale(model))]


def default_timing_size(eager: Runner) -> tuple[int, int]:
    """LR (width, height) for timing the backends: 640x360 when one eager pass on 128x128 is quick,
    else 128x128 to keep the measurement short.

    Small models' ranking shifts with size: per-call overheads weigh more on small inputs, and cache
    effects on large ones (edsr_mini x2 here: channels-last and ONNX Runtime tie at 256x256, ONNX
    Runtime is 1.45x faster at 640x360). 640x360 is the size MACs are stated at (a 720p output) and
    about the pixel count of the largest auto tile (512x512), so it ranks paths as they serve."""
    probe = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    eager(probe)  # warm-up
    start = time.perf_counter()
    eager(probe)
    return QUICK_MODEL_TIMING_SIZE if time.perf_counter() - start < QUICK_PROBE_SECONDS else (128, 128)


def measure_backends(
    model: nn.Module,
    cache_dir: str | Path | None = None,
    *,
    eval_dir: str | Path | None = None,
    candidates: Iterable[str] | None = None,
    timing_lr_size: tuple[int, int] | None = None,
) -> BackendDecision:
    """Time eager and each candidate; evaluate the faster ones; pick the fastest within 0.05 dB of fp32.

    eval_dir: an evaluation set (benchmark layout or a folder of HR images); default Set5 from the
    shared data, else the bundled sample set.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    names = list(candidate_backends(model) if candidates is None else candidates)
    if model_family(model) == "swinir" and "fp16" in names:
        names.remove("fp16")  # never fp16 for SwinIR, even when asked
    if eval_dir is None:
        eval_dir = shared_eval_dir()
    if eval_dir is None:
        from core.data.sample import sample_dir

        eval_dir = sample_dir(cache_dir / "samples")
    eval_dir = Path(eval_dir)

    eager = prepare_backend(model, "eager", cache_dir)
    width, height = timing_lr_size or default_timing_size(eager)
    lr = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    runners: dict[str, Runner] = {"eager": eager}
    unavailable: dict[str, str] = {}
    for name in names:
        try:
            runners[name] = prepare_backend(model, name, cache_dir)
        except UserError as error:
            unavailable[name] = str(error)
    seconds = time_runners(runners, lr)
    eager_seconds = seconds["eager"]
    trials = [BackendTrial("eager", eager_seconds, 1.0, accepted=True, reason="fp32 reference")]
    for name in names:
        if name in unavailable:
            trials.append(BackendTrial(name, math.inf, 0.0, reason=f"unavailable: {unavailable[name]}"))
        else:
            trials.append(BackendTrial(name, seconds[name], eager_seconds / seconds[name]))

    faster = [t for t in trials[1:] if t.seconds < 0.95 * eager_seconds]  # 5% margin against timing noise
    for trial in trials[1:]:
        if trial not in faster and not trial.reason:
            trial.reason = f"not faster than eager ({trial.speedup:.2f}x)"
    psnr_fp32 = None
    if faster:
        images = _eval_images(model, eval_dir)
        psnr_fp32 = mean_psnr(model, eager, images)
        trials[0].psnr = psnr_fp32
        for trial in faster:
            trial.psnr = mean_psnr(model, prepare_backend(model, trial.backend, cache_dir), images)
            drift = abs(trial.psnr - psnr_fp32)
            trial.accepted = drift <= PSNR_TOLERANCE_DB
            trial.reason = f"{trial.speedup:.2f}x faster, |dPSNR| {drift:.4f} dB" + (
                "" if trial.accepted else f" > {PSNR_TOLERANCE_DB}"
            )
    best = min((t for t in trials if t.accepted), key=lambda t: t.seconds)
    fingerprint = model_fingerprint(model)
    machine = machine_signature()
    return BackendDecision(
        backend=best.backend,
        key=decision_key(fingerprint, machine),
        model_fingerprint=fingerprint,
        family=model_family(model),
        eval_set=str(eval_dir),
        psnr_fp32=psnr_fp32,
        trials=trials,
        machine=machine,
        timing_lr_size=(width, height),
    )


def decision_key(fingerprint: str, machine: dict[str, str]) -> str:
    """Cache key: model fingerprint + a hash of the machine signature and the decision version."""
    machine_hash = hashlib.sha256(
        json.dumps([machine, DECISION_VERSION], sort_keys=True).encode()
    ).hexdigest()
    return f"{fingerprint}-{machine_hash[:8]}"


def decision_path(model: nn.Module, cache_dir: str | Path | None = None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / "backend" / f"{decision_key(model_fingerprint(model), machine_signature())}.json"


def cached_backend(model: nn.Module, cache_dir: str | Path | None = None) -> str | None:
    """The backend `choose_backend` already decided for this model on this machine, or None (cheap)."""
    path = decision_path(model, cache_dir)
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable backend decision %s", path)
        return None
    if cached.get("version") == DECISION_VERSION and cached.get("backend") in BACKENDS:
        return str(cached["backend"])
    return None


def choose_backend(model: nn.Module, cache_dir: str | Path | None = None, **measure_options) -> str:
    """The fastest backend whose Y-PSNR stays within 0.05 dB of fp32 for this model on this machine.

    Measured once per (model config + weights, machine) and cached as JSON under cache_dir/backend/;
    later calls read the file. `measure_options` go to `measure_backends` (eval_dir, candidates, ...).
    """
    cached = cached_backend(model, cache_dir)
    if cached is not None:
        return cached
    decision = measure_backends(model, cache_dir, **measure_options)
    path = decision_path(model, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(decision.to_json())
    os.replace(partial, path)
    log.info("backend for %s: %s", decision.family, decision.backend)
    return decision.backend
