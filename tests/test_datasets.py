"""Image decode/encode, evaluation sets and bicubic reference figures, and the training patch sampler."""

import io
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from core.data.datasets import (
    TrainImages,
    bicubic_upscale,
    evaluate,
    find_pairs,
    load_eval_set,
)
from core.data.images import (
    EXIF_ORIENTATION_TAG,
    encode_image,
    load_rgb_uint8,
    normalise_format,
    read_image,
)
from core.data.imresize import downscale, imresize
from core.data.sample import SAMPLE_NAMES, sample_dir
from core.errors import ImageError, UserError

# ------------------------------------------------------------------------------------------ images


def png_bytes(array: np.ndarray, **save_options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def asymmetric_rgb(height: int = 24, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    img[:4, :8] = (255, 0, 0)  # a red top-left corner marks the orientation
    return img


def test_16bit_rgb_png_keeps_16_bits_in_rgb_order():
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(9, 11, 3), dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    assert ok
    decoded = read_image(encoded.tobytes())
    assert (decoded.bit_depth, decoded.mode, decoded.format, decoded.alpha) == (16, "rgb", "PNG", None)
    assert decoded.rgb.dtype == np.float32 and decoded.rgb.shape == (9, 11, 3)
    np.testing.assert_array_equal(np.round(decoded.rgb.astype(np.float64) * 65535), rgb16)
    # Pillow alone would have dropped the low byte; the round trip keeps all 16 bits.
    again = read_image(encode_image(decoded.rgb, "png", bit_depth=16))
    np.testing.assert_array_equal(np.round(again.rgb.astype(np.float64) * 65535), rgb16)
    assert again.bit_depth == 16
    np.testing.assert_array_equal(load_rgb_uint8(encoded.tobytes()), np.round(rgb16 / 257).astype(np.uint8))


def test_16bit_gray_and_rgba_pngs():
    rng = np.random.default_rng(1)
    gray16 = rng.integers(0, 65536, size=(6, 7), dtype=np.uint16)
    decoded = read_image(cv2.imencode(".png", gray16)[1].tobytes())
    assert (decoded.bit_depth, decoded.mode) == (16, "gray")
    np.testing.assert_array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])
    np.testing.assert_array_equal(np.round(decoded.rgb[..., 1].astype(np.float64) * 65535), gray16)
    out = read_image(encode_image(decoded.rgb, "png", mode="gray", bit_depth=16))
    assert (out.mode, out.bit_depth) == ("gray", 16)
    np.testing.assert_array_equal(np.round(out.rgb[..., 0].astype(np.float64) * 65535), gray16)

    rgba16 = rng.integers(0, 65536, size=(6, 7, 4), dtype=np.uint16)
    decoded = read_image(cv2.imencode(".png", cv2.cvtColor(rgba16, cv2.COLOR_RGBA2BGRA))[1].tobytes())
    assert (decoded.bit_depth, decoded.mode) == (16, "rgba")
    np.testing.assert_array_equal(np.round(decoded.alpha.astype(np.float64) * 65535), rgba16[..., 3])
    np.testing.assert_array_equal(np.round(decoded.rgb.astype(np.float64) * 65535), rgba16[..., :3])


def test_rgba_gray_and_palette_8bit_round_trip():
    rgba = np.dstack([asymmetric_rgb(), np.linspace(0, 255, 24 * 40).reshape(24, 40).astype(np.uint8)])
    decoded = read_image(png_bytes(rgba))
    assert (decoded.mode, decoded.bit_depth) == ("rgba", 8)
    np.testing.assert_array_equal(np.round(decoded.alpha * 255).astype(np.uint8), rgba[..., 3])
    encoded = encode_image(decoded.rgb, "png", alpha=decoded.alpha, mode=decoded.mode)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), rgba)
    np.testing.assert_array_equal(load_rgb_uint8(png_bytes(rgba)), rgba[..., :3])  # alpha dropped
    # JPEG has no alpha: transparent pixels are composited over white.
    transparent = rgba.copy()
    transparent[..., 3] = 0
    decoded = read_image(png_bytes(transparent))
    jpg = Image.open(io.BytesIO(encode_image(decoded.rgb, "jpg", alpha=decoded.alpha, mode="rgba")))
    assert jpg.mode == "RGB" and np.asarray(jpg).min() >= 250

    gray = asymmetric_rgb()[..., 1]
    decoded = read_image(png_bytes(gray))
    assert (decoded.mode, decoded.alpha) == ("gray", None)
    assert decoded.rgb.shape == (24, 40, 3)
    np.testing.assert_array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])
    written = Image.open(io.BytesIO(encode_image(decoded.rgb, "png", mode="gray")))
    assert written.mode == "L"
    np.testing.assert_array_equal(np.asarray(written), gray)

    gray_alpha = np.dstack([gray, gray[::-1]])
    decoded = read_image(png_bytes(gray_alpha))
    assert decoded.mode == "gray_alpha" and decoded.alpha is not None
    written = Image.open(io.BytesIO(encode_image(decoded.rgb, "png", alpha=decoded.alpha, mode=decoded.mode)))
    assert written.mode == "LA"
    np.testing.assert_array_equal(np.asarray(written), gray_alpha)

    palette = Image.fromarray(asymmetric_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    decoded = read_image(buffer.getvalue())
    assert decoded.mode == "rgba" and decoded.alpha is not None and decoded.alpha.min() == 0.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_jpeg_is_made_upright_and_written_with_orientation_1(orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    exif[0x010F] = "srcompress-test"  # Make, to check the rest of EXIF survives
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    Image.fromarray(asymmetric_rgb()).save(buffer, format="JPEG", quality=95, exif=exif, icc_profile=icc)
    data = buffer.getvalue()

    decoded = read_image(data)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert decoded.orientation == orientation
    assert decoded.format == "JPEG" and decoded.icc_profile == icc
    np.testing.assert_array_equal(np.round(decoded.rgb * 255).astype(np.uint8), upright)
    assert decoded.rgb.shape[:2] == ((24, 40) if orientation <= 4 else (40, 24))

    for fmt in ("jpg", "png", "webp"):
        written = Image.open(io.BytesIO(encode_image(decoded.rgb, fmt, icc_profile=icc, exif=decoded.exif)))
        assert written.getexif().get(EXIF_ORIENTATION_TAG) == 1
        assert written.getexif().get(0x010F) == "srcompress-test"
        assert written.info.get("icc_profile") == icc
        assert written.size == (decoded.width, decoded.height)


def test_16bit_png_output_keeps_icc_and_exif():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    rgb = np.random.default_rng(2).random((5, 6, 3)).astype(np.float32)
    data = encode_image(rgb, "png", bit_depth=16, icc_profile=icc, exif=exif.tobytes())
    decoded = read_image(data)
    assert decoded.bit_depth == 16 and decoded.icc_profile == icc and decoded.orientation == 1
    np.testing.assert_allclose(decoded.rgb, rgb, atol=0.5 / 65535 + 1e-7)


def test_bad_files_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a readable image"):
        read_image(b"this is not an image at all")
    with pytest.raises(ImageError, match="empty"):
        read_image(b"")
    full_png = png_bytes(asymmetric_rgb(200, 200))
    with pytest.raises(ImageError, match="truncated"):
        read_image(full_png[: len(full_png) // 2])
    buffer = io.BytesIO()
    Image.fromarray(asymmetric_rgb(200, 200)).save(buffer, format="JPEG")
    with pytest.raises(ImageError, match="truncated"):
        read_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    rgb16 = np.zeros((64, 64, 3), dtype=np.uint16)
    png16 = cv2.imencode(".png", rgb16)[1].tobytes()
    with pytest.raises(ImageError, match="truncated|corrupt"):
        read_image(png16[:-30])
    with pytest.raises(ImageError, match="over the 1,000-pixel limit"):
        read_image(full_png, max_pixels=1000)
    text_file = tmp_path / "notes.png"
    text_file.write_text("hello")
    with pytest.raises(ImageError):
        load_rgb_uint8(text_file)


def test_output_format_names():
    assert normalise_format("auto", "JPEG") == "jpg"
    assert normalise_format("auto", "BMP") == "png"
    assert normalise_format("WEBP") == "webp"
    with pytest.raises(ImageError):
        normalise_format("gif")


# ------------------------------------------------------------------------------------------ evaluation


@pytest.mark.shared
def test_find_pairs_benchmark_layout_and_plain_folder(shared_data, tmp_path):
    set5 = shared_data / "benchmark" / "Set5"
    pairs = find_pairs(set5, 2)
    assert [p.name for p in pairs] == ["baby", "bird", "butterfly", "head", "woman"]
    assert all(p.lr_path is not None and p.lr_path.name == f"{p.name}x2.png" for p in pairs)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(set5 / "HR" / "bird.png", plain / "bird.png")
    (plain / "readme.txt").write_text("not an image")
    shutil.copy(set5 / "HR" / "bird.png", plain / ".bird.123.tmp.png")  # e.g. a half-written file
    assert find_pairs(plain, 3) == [("bird", plain / "bird.png", None)]
    with pytest.raises(UserError, match="not found"):
        find_pairs(tmp_path / "nope", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        find_pairs(tmp_path / "empty", 2)
    with pytest.raises(UserError, match="scale"):
        find_pairs(set5, 0)


@pytest.mark.shared
def test_set14_bridge_grayscale_is_loaded_as_rgb(shared_data):
    root = shared_data / "benchmark" / "Set14"
    assert Image.open(root / "HR" / "bridge.png").mode == "L"
    bridge = next(img for img in load_eval_set(root, 2) if img.name == "bridge")
    assert bridge.hr.shape == (512, 512, 3) and bridge.lr.shape == (256, 256, 3)
    np.testing.assert_array_equal(bridge.hr[..., 0], bridge.hr[..., 2])
    assert bridge.lr_source == "file"


@pytest.mark.shared
@pytest.mark.parametrize(
    ("benchmark_set", "scale", "psnr", "ssim"),
    [
        ("Set5", 2, 33.678, 0.9304),
        ("Set14", 2, 30.327, 0.8700),
        ("B100", 2, 29.555, 0.8434),
        ("Set5", 4, 28.431, 0.8113),
    ],
)
@pytest.mark.slow
def test_bicubic_reference_figures(shared_data, benchmark_set, scale, psnr, ssim):
    progress = []
    result = evaluate(
        lambda lr: bicubic_upscale(lr, scale),
        shared_data / "benchmark" / benchmark_set,
        scale,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    print(f"bicubic x{scale} {benchmark_set}: PSNR-Y {result.psnr:.4f} dB, SSIM-Y {result.ssim:.5f}")
    assert result.psnr == pytest.approx(psnr, abs=0.01)
    assert result.ssim == pytest.approx(ssim, abs=0.0005)
    assert progress[-1] == (len(result.images), len(result.images)) and len(progress) == len(result.images)
    assert result.crop_border == scale and result.dataset == benchmark_set
    assert all(s.lr_source == "file" for s in result.images)
    assert result.as_dict()["images"][0]["name"] == result.images[0].name


@pytest.mark.shared
def test_plain_hr_folder_gives_the_same_figures_as_the_lr_files(shared_data, tmp_path):
    # The LR made here is bit-identical to the files, so an HR-only copy of Set5 scores the same.
    set5 = shared_data / "benchmark" / "Set5"
    shutil.copytree(set5 / "HR", tmp_path / "Set5_hr_only")
    with_files = evaluate(lambda lr: bicubic_upscale(lr, 2), set5, 2)
    hr_only = evaluate(lambda lr: bicubic_upscale(lr, 2), tmp_path / "Set5_hr_only", 2)
    assert all(s.lr_source == "imresize" for s in hr_only.images)
    assert hr_only.psnr == with_files.psnr and hr_only.ssim == with_files.ssim


def test_evaluate_on_sample_set_checks_output_shape(tmp_path):
    folder = sample_dir(tmp_path)
    result = evaluate(lambda lr: bicubic_upscale(lr, 3), folder, 3)
    print(f"sample set bicubic x3: {result.psnr:.3f} dB / {result.ssim:.4f}")
    assert [s.name for s in result.images] == sorted(SAMPLE_NAMES)
    assert 20 < result.psnr < 40 and 0.5 < result.ssim < 1
    with pytest.raises(ValueError, match="expected"):
        evaluate(lambda lr: bicubic_upscale(lr, 2), folder, 3)


def test_sample_dir_is_small_cached_and_divisible(tmp_path):
    folder = sample_dir(tmp_path)
    files = sorted(folder.glob("*.png"))
    assert [f.stem for f in files] == sorted(SAMPLE_NAMES)
    first_write = {f.name: f.stat().st_mtime_ns for f in files}
    for f in files:
        h, w = np.asarray(Image.open(f)).shape[:2]
        assert max(h, w) <= 256 and h % 12 == 0 and w % 12 == 0
    assert sample_dir(tmp_path) == folder
    assert {f.name: f.stat().st_mtime_ns for f in folder.glob("*.png")} == first_write


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def sample_train(tmp_path_factory) -> TrainImages:
    folder = sample_dir(tmp_path_factory.mktemp("sample"))
    return TrainImages.from_folders(folder, 2, lr_patch=24, batch_size=8, seed=7)


def test_batches_are_deterministic_per_seed_and_iteration(sample_train):
    lr, hr = sample_train.batch(3)
    assert lr.shape == (8, 3, 24, 24) and hr.shape == (8, 3, 48, 48)
    assert lr.dtype == torch.float32 and 0.0 <= float(lr.min()) and float(hr.max()) <= 1.0
    again = TrainImages(sample_train.paths, 2, lr_patch=24, batch_size=8, seed=7)
    lr2, hr2 = again.batch(3)  # a fresh object (e.g. a resumed run) gives the same batch 3
    assert torch.equal(lr, lr2) and torch.equal(hr, hr2)
    assert not torch.equal(sample_train.batch(4)[0], lr)
    other_seed = TrainImages(sample_train.paths, 2, lr_patch=24, batch_size=8, seed=8)
    assert not torch.equal(other_seed.batch(3)[0], lr)


def test_patches_are_aligned_and_augmented_jointly(sample_train):
    # Undoing each patch's recorded augmentation gives the source crops at (top, left) and (2top, 2left);
    # the LR of the HR patch made by imresize equals the LR patch exactly away from the kernel's reach
    # at the patch border (3 LR px), with or without the augmentation.
    flips_seen = set()
    for iteration in range(5):
        lr, hr, origins = sample_train.sample(iteration)
        for origin, lr_patch, hr_patch in zip(origins, lr, hr, strict=True):
            flips = (origin.hflip, origin.vflip, origin.transpose)
            flips_seen.add(flips)
            # imresize goes height first; a transposed patch was made width first, so resize it that way.
            if origin.transpose:
                relr = imresize(hr_patch.transpose(1, 0, 2), 0.5).transpose(1, 0, 2)
            else:
                relr = imresize(hr_patch, 0.5)
            np.testing.assert_array_equal(relr[3:-3, 3:-3], lr_patch[3:-3, 3:-3])
            lr_src, hr_src = lr_patch, hr_patch
            if origin.transpose:
                lr_src, hr_src = lr_src.transpose(1, 0, 2), hr_src.transpose(1, 0, 2)
            if origin.vflip:
                lr_src, hr_src = lr_src[::-1], hr_src[::-1]
            if origin.hflip:
                lr_src, hr_src = lr_src[:, ::-1], hr_src[:, ::-1]
            t, left = origin.top, origin.left
            np.testing.assert_array_equal(
                lr_src, sample_train.lr_images[origin.image][t : t + 24, left : left + 24]
            )
            hr_image = sample_train.hr_images[origin.image]
            np.testing.assert_array_equal(hr_src, hr_image[2 * t : 2 * t + 48, 2 * left : 2 * left + 48])
            relr_src = imresize(np.ascontiguousarray(hr_src), 0.5)[3:-3, 3:-3]
            np.testing.assert_array_equal(relr_src, lr_src[3:-3, 3:-3])
    assert len(flips_seen) >= 6  # 40 patches cover most of the 8 flip combinations
    # Misaligned by one HR pixel, the same check fails: the test can tell.
    lr, hr, _ = sample_train.sample(0)
    shifted = np.roll(hr[0], 1, axis=1)
    assert np.abs(imresize(shifted, 0.5).astype(int) - lr[0].astype(int))[3:-3, 3:-3].max() > 1


def test_extra_arrays_are_cropped_and_augmented_like_the_hr_patches(sample_train):
    # An "extra" equal to the HR images themselves must come back equal to the HR patches.
    extra = [hr.astype(np.float32) / 255.0 for hr in sample_train.hr_images]
    lr, hr, cropped = sample_train.batch(2, extra=extra)
    lr2, hr2 = sample_train.batch(2)
    assert torch.equal(lr, lr2) and torch.equal(hr, hr2)
    assert cropped.shape == hr.shape and cropped.dtype == torch.float32
    torch.testing.assert_close(cropped, hr, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="HR size"):
        sample_train.batch(2, extra=[e[:-1] for e in extra])


def test_lr_images_are_matlab_downscales_and_no_augment_is_plain_crops(sample_train):
    for hr, lr in zip(sample_train.hr_images, sample_train.lr_images, strict=True):
        np.testing.assert_array_equal(lr, downscale(hr, 2))
    plain = TrainImages(sample_train.paths, 2, lr_patch=24, batch_size=8, seed=7, augment=False)
    lr, hr, origins = plain.sample(0)
    for (index, top, left, *flips), lr_patch, hr_patch in zip(origins, lr, hr, strict=True):
        assert not any(flips)
        np.testing.assert_array_equal(lr_patch, plain.lr_images[index][top : top + 24, left : left + 24])
        np.testing.assert_array_equal(
            hr_patch, plain.hr_images[index][2 * top : 2 * top + 48, 2 * left : 2 * left + 48]
        )
    assert plain.batches_per_epoch == 1 and len(plain) == len(SAMPLE_NAMES)


def test_gray_rgba_small_images_in_training_folder(tmp_path):
    rgb = asymmetric_rgb(64, 64)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((64, 64), 10, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[:20, :20]).save(tmp_path / "tiny.png")
    train = TrainImages.from_folders(tmp_path, 2, lr_patch=16, batch_size=2, seed=0)
    assert train.names == ["gray.png", "rgba.png"] and train.skipped == ["tiny.png"]
    gray_hr = train.hr_images[0]
    np.testing.assert_array_equal(gray_hr[..., 0], gray_hr[..., 1])
    np.testing.assert_array_equal(train.hr_images[1], rgb)  # alpha dropped, colour untouched
    with pytest.raises(UserError, match="at least"):
        TrainImages.from_folders(tmp_path, 4, lr_patch=17)
