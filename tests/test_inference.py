"""Tiled upscaling, backends, backend choice and file round trips (core.infer, method.md §9)."""

from __future__ import annotations

import io
import json
import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import core.infer.runners as runners
import core.infer.tiling as tiling
import core.infer.tuning as tuning
from core.errors import UserError
from core.infer.runners import BACKENDS
from core.infer.tiling import auto_tile_size, axis_starts, plan_tiles, tile_weights, upscale_tiled
from core.infer.tuning import candidate_backends, choose_backend, decision_path, prepare_backend
from core.infer.upscale import upscale_array, upscale_file
from core.models.build import create_model
from core.models.config import EDSRConfig

TILED_PRESETS = ("edsr_mini", "rlfn_s", "swinir_mini")


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A natural-ish float RGB image in [0, 1]: blurred noise with a gradient, no flat areas."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((height, width, 3)).astype(np.float32), (0, 0), 1.5)
    ramp = np.linspace(0.2, 0.8, width, dtype=np.float32)[None, :, None]
    image = 0.5 * ramp + 0.5 * (noise - noise.min()) / (noise.max() - noise.min())
    return np.ascontiguousarray(image, dtype=np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: create_model(name, 2).eval() for name in TILED_PRESETS}


# ------------------------------------------------------------------------------------------ tile plan


def test_axis_starts_cover_with_at_least_the_overlap():
    for size, tile, overlap in [(100, 48, 16), (96, 64, 32), (1080, 512, 32), (513, 512, 32), (40, 64, 32)]:
        starts = axis_starts(size, tile, overlap)
        piece = min(tile, size)
        assert starts[0] == 0 and starts[-1] + piece == size
        assert all(b - a <= piece - overlap for a, b in zip(starts, starts[1:], strict=False))
    assert axis_starts(100, 48, 16) == [0, 26, 52]


def test_plan_tiles_are_multiples_of_8_and_weights_never_vanish():
    height, width, tile, overlap, scale = 96, 104, 48, 16, 2
    tiles = plan_tiles(height, width, tile, overlap)
    assert len(tiles) == 9
    assert all(t.height % 8 == 0 and t.width % 8 == 0 for t in tiles)
    weight_sum = np.zeros((height * scale, width * scale))
    for t in tiles:
        weights = tile_weights(t, height, width, scale, overlap)
        assert weights.shape == (t.height * scale, t.width * scale)
        weight_sum[t.y * scale : (t.y + t.height) * scale, t.x * scale : (t.x + t.width) * scale] += weights
    assert weight_sum.min() >= 0.5  # every output pixel has a well-weighted tile
    corner = tile_weights(tiles[4], height, width, scale, overlap)  # the middle tile: feathered on 4 sides
    assert corner[0, 0] < 1e-3 and corner[corner.shape[0] // 2, corner.shape[1] // 2] == 1.0


def test_auto_tile_size_whole_image_when_it_fits_else_multiple_of_8(models):
    model = models["edsr_mini"]
    assert auto_tile_size(model, 360, 640) == 640  # 640x360 fits the 1 GiB CPU budget
    per_pixel = tiling.activation_bytes_per_lr_pixel(model)
    tile = auto_tile_size(model, 1080, 1920, budget_bytes=300 * 300 * per_pixel)
    assert tile == 296
    assert auto_tile_size(model, 4000, 4000, budget_bytes=2000 * 2000 * per_pixel) == tiling.MAX_AUTO_TILE
    assert auto_tile_size(model, 4000, 4000, budget_bytes=4000 * 4000 * per_pixel) == 4000


# ------------------------------------------------------------------------------------------ tiled vs whole


@pytest.mark.slow
@pytest.mark.parametrize("preset", TILED_PRESETS)
def test_tiled_upscale_matches_whole_image(models, preset):
    model = models[preset]
    image = smooth_image(64, 72)
    # Unclamped outputs: random-weight models saturate much of [0, 1], which would hide differences.
    runner = prepare_backend(model, "eager")
    whole = upscale_tiled(runner, image, scale=2, tile=128, overlap=16)
    calls: list[tuple[int, int]] = []
    tiled = upscale_tiled(
        runner, image, scale=2, tile=40, overlap=16, on_progress=lambda i, n: calls.append((i, n))
    )
    assert whole.shape == tiled.shape == (128, 144, 3) and tiled.dtype == np.float32
    n = calls[-1][1]
    assert n >= 4 and calls == [(i, n) for i in range(1, n + 1)]  # "tile i/n", once per tile
    peak = max(1.0, float(whole.max() - whole.min()))
    value = psnr(whole / peak, tiled / peak)
    print(
        f"{preset}: tiled ({n} tiles of 40, overlap 16) vs whole: PSNR {value:.1f} dB (std {whole.std():.3f})"
    )
    assert whole.std() > 0.02
    assert value >= 50.0
    clamped = upscale_array(model, image, tile=40, overlap=16)  # the public path: same, clamped to [0, 1]
    np.testing.assert_allclose(clamped, np.clip(tiled, 0, 1), atol=1e-6)


def test_swinir_sizes_not_divisible_by_8(models):
    model = models["swinir_mini"]
    image = smooth_image(37, 53, seed=1)
    whole = upscale_array(model, image, tile=128)
    assert whole.shape == (74, 106, 3)
    with torch.inference_mode():  # the model pads and crops by itself: same result
        direct = model(torch.from_numpy(image.transpose(2, 0, 1).copy())[None])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(whole, np.clip(direct, 0, 1), atol=1e-5)
    calls: list[tuple[int, int]] = []
    tiled = upscale_array(model, image, tile=32, overlap=16, on_progress=lambda i, n: calls.append((i, n)))
    value = psnr(whole, tiled)
    print(f"swinir_mini 53x37: tiled ({calls[-1][1]} tiles of 32) vs whole PSNR {value:.1f} dB")
    assert calls[-1][1] >= 4 and value >= 45.0


def test_tile_argument_validation(models):
    model = models["edsr_mini"]
    image = smooth_image(20, 20)
    with pytest.raises(UserError):
        upscale_array(model, image, tile=4)
    with pytest.raises(UserError):
        upscale_array(model, image[..., :2])
    with pytest.raises(UserError):
        upscale_array(model, image, backend="fp64")
    out = upscale_array(model, image, tile=13)  # rounded down to 8: still a valid, complete upscale
    assert out.shape == (40, 40, 3)


class OutOfMemoryAbove:
    """A runner that fails like a CUDA allocator for tiles wider than `limit` LR pixels."""

    name = "eager"

    def __init__(self, model: nn.Module, limit: int):
        self.inner = prepare_backend(model, "eager")
        self.limit = limit
        self.widths: list[int] = []

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        self.widths.append(lr.shape[3])
        if lr.shape[3] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(lr)


def test_out_of_memory_retries_at_half_tile(models):
    model = models["edsr_mini"]
    image = smooth_image(64, 64)
    runner = OutOfMemoryAbove(model, limit=32)
    calls: list[tuple[int, int]] = []
    out = upscale_array(
        model, image, tile=64, overlap=16, backend=runner, on_progress=lambda i, n: calls.append((i, n))
    )
    assert runner.widths[0] == 64 and set(runner.widths[1:]) == {32}
    assert calls[-1] == (calls[-1][1], calls[-1][1]) and calls[-1][1] >= 4
    assert psnr(out, upscale_array(model, image)) > 50


# ------------------------------------------------------------------------------------------ backends


@pytest.mark.slow
@pytest.mark.parametrize("preset", TILED_PRESETS)
def test_backends_agree_with_eager(models, preset, tmp_path):
    model = models[preset]
    image = smooth_image(24, 32, seed=2)
    eager = upscale_array(model, image, backend="eager")
    for name in ("channels_last", "sdpa", "onnxruntime"):
        fast = upscale_array(model, image, backend=name, cache_dir=tmp_path)
        diff = float(np.abs(fast - eager).max())
        print(f"{preset} {name}: max |diff| vs eager {diff:.2e}")
        assert diff < 1e-4
    bf16 = upscale_array(model, image, backend="bf16")
    print(f"{preset} bf16: PSNR vs eager {psnr(bf16, eager):.1f} dB")
    assert np.isfinite(bf16).all() and psnr(bf16, eager) > 30
    assert not model.training  # eval mode restored, and the caller's model was not converted
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.slow
def test_onnxruntime_runner_caches_graphs_on_disk(models, tmp_path):
    model = models["swinir_mini"]
    runner = prepare_backend(model, "onnxruntime", tmp_path)
    image = smooth_image(16, 24, seed=3)
    upscale_array(model, image, backend=runner)
    upscale_array(model, image, backend=runner)
    upscale_array(model, smooth_image(20, 24, seed=3), backend=runner)  # padded to 24x24
    graphs = sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx"))
    assert graphs == [runner.graph_path(24, 16).name, runner.graph_path(24, 24).name]  # one per shape
    assert graphs[0].startswith(f"{runner.fingerprint}-24x16")
    assert len(runner.sessions) == 2
    edsr_runner = prepare_backend(models["edsr_mini"], "onnxruntime", tmp_path)
    upscale_array(models["edsr_mini"], image, backend=edsr_runner)
    upscale_array(models["edsr_mini"], smooth_image(24, 56), backend=edsr_runner)
    assert edsr_runner.graph_path(24, 16) == edsr_runner.graph_path(56, 24)  # one graph for every shape
    assert edsr_runner.graph_path(24, 16).is_file()
    assert len(edsr_runner.sessions) == 1


@pytest.mark.slow
def test_fused_attention_matches_swinir_attention(models):
    model = models["swinir_mini"]
    fused = runners.with_fused_attention(model)
    assert fused is not model
    with torch.inference_mode():
        for batch, height, width in [(1, 64, 64), (2, 24, 40), (1, 16, 16)]:  # img_size mask, other sizes
            lr = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
            diff = float((fused(lr) - model(lr)).abs().max())
            assert diff < 1e-5, (batch, height, width, diff)


class InfiniteInBF16(nn.Module):
    """A stand-in model whose output overflows under bf16 autocast (as fp16 SwinIR does)."""

    def __init__(self):
        super().__init__()
        self.config = EDSRConfig(scale=2)
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.dtype == torch.bfloat16:
            y = y * float("inf")
        return self.shuffle(y)


def test_bf16_falls_back_to_fp32_on_non_finite_output():
    torch.manual_seed(0)
    model = InfiniteInBF16().eval()
    image = smooth_image(16, 24)
    runner = prepare_backend(model, "bf16")
    out = upscale_array(model, image, backend=runner)
    assert runner.fell_back and np.isfinite(out).all()
    np.testing.assert_allclose(out, upscale_array(model, image, backend="eager"), atol=1e-6)


def test_fp16_never_for_swinir(models, monkeypatch):
    with pytest.raises(UserError, match="SwinIR"):
        prepare_backend(models["swinir_mini"], "fp16")
    monkeypatch.setattr(tuning, "model_device", lambda model: torch.device("cuda"))
    assert "fp16" in candidate_backends(models["edsr_mini"])
    assert "fp16" not in candidate_backends(models["swinir_mini"])
    assert "sdpa" in candidate_backends(models["swinir_mini"])  # fused attention: SwinIR only
    assert "sdpa" not in candidate_backends(models["edsr_mini"])


# ------------------------------------------------------------------------------------------ choose_backend


@pytest.fixture
def tiny_eval_dir(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    for seed in range(2):
        hr = np.round(smooth_image(48, 64, seed=seed) * 255).astype(np.uint8)
        Image.fromarray(hr).save(folder / f"img{seed}.png")
    return folder


@pytest.mark.slow
def test_choose_backend_caches_its_decision(models, tmp_path, tiny_eval_dir, monkeypatch):
    model = models["edsr_mini"]
    speeds = {"eager": 1.0, "channels_last": 0.6, "onnxruntime": 0.4}
    measured: list[str] = []

    def fake_time(runners, lr, repeats=5):
        measured.extend(runners)
        return {name: speeds.get(name, 1.0) for name in runners}  # bf16 only where the CPU has it

    monkeypatch.setattr(tuning, "time_runners", fake_time)
    cache = tmp_path / "cache"
    picked = choose_backend(model, cache, eval_dir=tiny_eval_dir, timing_lr_size=(32, 32))
    assert picked == "onnxruntime"  # the fastest, and its PSNR equals fp32's
    record = json.loads(decision_path(model, cache).read_text())
    trials = {t["backend"]: t for t in record["trials"]}
    assert (
        abs(trials["onnxruntime"]["psnr"] - record["psnr_fp32"]) <= 0.05 and trials["onnxruntime"]["accepted"]
    )
    print(f"decision: {record['backend']}, fp32 PSNR {record['psnr_fp32']:.3f} dB, trials {trials}")

    measured.clear()
    monkeypatch.setattr(tuning, "measure_backends", lambda *a, **k: pytest.fail("re-measured"))
    assert choose_backend(model, cache) == "onnxruntime"
    assert measured == []


@pytest.mark.slow
def test_choose_backend_rejects_inaccurate_and_slow_paths(models, tmp_path, tiny_eval_dir, monkeypatch):
    model = models["swinir_mini"]
    monkeypatch.setattr(
        tuning,
        "time_runners",
        lambda runners, lr, repeats=5: {n: 1.0 if n == "eager" else 0.5 for n in runners},
    )
    real_psnr = tuning.mean_psnr
    monkeypatch.setattr(
        tuning,
        "mean_psnr",
        lambda model, runner, images: (
            real_psnr(model, runner, images) - (0.2 if runner.name == "bf16" else 0.0)
        ),
    )
    decision = tuning.measure_backends(
        model,
        tmp_path,
        eval_dir=tiny_eval_dir,
        candidates=["bf16", "fp16", "channels_last"],
        timing_lr_size=(32, 32),
    )
    trials = {t.backend: t for t in decision.trials}
    assert "fp16" not in trials  # never even tried for SwinIR
    assert not trials["bf16"].accepted and "> 0.05" in trials["bf16"].reason
    assert decision.backend == "channels_last"

    monkeypatch.setattr(
        tuning,
        "time_runners",
        lambda runners, lr, repeats=5: {n: 1.0 if n == "eager" else 2.0 for n in runners},
    )
    decision = tuning.measure_backends(model, tmp_path, eval_dir=tiny_eval_dir, candidates=["channels_last"])
    assert decision.backend == "eager" and decision.psnr_fp32 is None  # nothing faster: no evaluation needed


@pytest.mark.slow
def test_choose_backend_weighs_exported_formats_like_any_path(models, tmp_path, tiny_eval_dir, monkeypatch):
    """An exported format is a candidate: picked when fastest within 0.05 dB, refused when not."""
    model = models["edsr_mini"]
    eager = prepare_backend(model, "eager")

    class Format:
        def __init__(self, name, exact):
            self.name, self.exact = name, exact

        def __call__(self, lr):
            out = eager(lr)
            return out if self.exact else torch.zeros_like(out)

    formats = {
        "onnx_int8": Format("onnx_int8", exact=True),
        "openvino_int8": Format("openvino_int8", exact=False),
    }
    speeds = {"eager": 1.0, "onnx_int8": 0.3, "openvino_int8": 0.2}
    monkeypatch.setattr(
        tuning, "time_runners", lambda runners, lr, repeats=5: {n: speeds.get(n, 0.9) for n in runners}
    )
    cache = tmp_path / "cache"
    picked = choose_backend(model, cache, formats=formats, eval_dir=tiny_eval_dir, timing_lr_size=(32, 32))
    assert picked == "onnx_int8"
    trials = {t["backend"]: t for t in json.loads(decision_path(model, cache, formats).read_text())["trials"]}
    assert not trials["openvino_int8"]["accepted"] and "> 0.05" in trials["openvino_int8"]["reason"]
    assert tuning.cached_backend(model, cache, formats) == "onnx_int8"
    assert tuning.cached_backend(model, cache) is None  # other candidates, another decision
    assert prepare_backend(model, "onnx_int8", cache, formats) is formats["onnx_int8"]


def test_timing_size_grows_for_quick_models():
    assert tuning.default_timing_size(lambda lr: lr) == tuning.QUICK_MODEL_TIMING_SIZE == (640, 360)
    assert tuning.default_timing_size(lambda lr: time.sleep(0.2)) == (128, 128)


def test_backend_names():
    assert BACKENDS == ("eager", "channels_last", "sdpa", "bf16", "fp16", "onnxruntime")


# ------------------------------------------------------------------------------------------ files


def png_bytes(array: np.ndarray) -> bytes:
    if array.dtype == np.uint16:
        if array.ndim == 3:
            array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
        ok, encoded = cv2.imencode(".png", array)
        assert ok
        return encoded.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_upscale_file_gray_stays_gray(models, tmp_path):
    gray = np.round(smooth_image(20, 24)[..., 0] * 255).astype(np.uint8)
    destination = upscale_file(models["edsr_mini"], png_bytes(gray), tmp_path / "out.png")
    with Image.open(destination) as result:
        assert result.mode == "L" and result.size == (48, 40)


def test_upscale_file_rgba_keeps_bicubic_alpha(models):
    rgb = np.round(smooth_image(20, 24) * 255).astype(np.uint8)
    alpha = np.tile(np.linspace(0, 255, 24).astype(np.uint8), (20, 1))
    data = upscale_file(models["edsr_mini"], png_bytes(np.dstack([rgb, alpha])), None, fmt="png")
    with Image.open(io.BytesIO(data)) as result:
        assert result.mode == "RGBA" and result.size == (48, 40)
        out_alpha = np.asarray(result)[..., 3].astype(np.float64)
    expected = cv2.resize(alpha.astype(np.float32) / 255, (48, 40), interpolation=cv2.INTER_CUBIC)
    assert np.abs(out_alpha - np.round(np.clip(expected, 0, 1) * 255)).max() <= 1


def test_upscale_file_keeps_16_bit(models, tmp_path):
    rgb16 = np.round(smooth_image(20, 24) * 65535).astype(np.uint16)
    source = tmp_path / "in16.png"
    source.write_bytes(png_bytes(rgb16))
    destination = upscale_file(models["edsr_mini"], source, tmp_path / "out16.png")
    decoded = cv2.imread(str(destination), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint16 and decoded.shape == (40, 48, 3)
    reference = upscale_array(models["edsr_mini"], rgb16.astype(np.float32) / 65535)
    decoded_rgb = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB).astype(np.float64) / 65535
    assert np.abs(decoded_rgb - reference).max() < 1e-4  # 16-bit precision kept, not 8-bit steps


def test_upscale_file_format_from_extension_or_argument(models, tmp_path):
    rgb = np.round(smooth_image(16, 16) * 255).astype(np.uint8)
    source = png_bytes(rgb)
    with Image.open(upscale_file(models["edsr_mini"], source, tmp_path / "out.jpg")) as result:
        assert result.format == "JPEG" and result.size == (32, 32)
    with Image.open(io.BytesIO(upscale_file(models["edsr_mini"], source, None, fmt="webp"))) as result:
        assert result.format == "WEBP"
    with Image.open(io.BytesIO(upscale_file(models["edsr_mini"], source))) as result:
        assert result.format == "PNG"  # auto keeps the input's format
    with pytest.raises(UserError, match="gif"):
        upscale_file(models["edsr_mini"], source, tmp_path / "out.gif")
