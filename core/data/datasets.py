"""Evaluation sets, the benchmark evaluation loop, and the in-memory training patch sampler.

Evaluation (method.md §6, shared/data/README.md): a set is either the EDSR/BasicSR benchmark layout
(`HR/<name>.png` + `LR_bicubic/X{s}/<name>x{s}.png`) or a plain folder of HR images whose LR is made
here as imresize(mod_crop(HR, s), 1/s) — the recipe that reproduces the benchmark LR files bit for bit.
The SR output is quantized to uint8, the HR is cropped to the SR size from the top left, and PSNR/SSIM
are computed on Y with `crop_border = scale`.

Training (method.md §7): every image is decoded once into memory (uint8 RGB, mod-cropped), its LR is
made once with the same imresize, and batches of aligned random patches with joint hflip/vflip/
transpose are drawn from a generator seeded by (seed, iteration), so batch k is the same whether a run
is fresh or resumed.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import numpy as np
import torch

from core.data.images import load_rgb_uint8
from core.data.imresize import downscale, imresize, mod_crop
from core.errors import UserError
from core.metrics import psnr_y, quantize, ssim_y

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

UpscaleFn = Callable[[np.ndarray], np.ndarray]  # LR uint8 HxWx3 -> SR float [0, 1] (sH)x(sW)x3
ProgressFn = Callable[[int, int], None]  # (images done, images total)


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise UserError(f"scale must be a positive integer (2, 3, 4), got {scale!r}")
    return int(scale)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name, hidden (.*) files skipped. UserError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    paths = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not paths:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths


# ------------------------------------------------------------------------------------------ evaluation


class ImagePair(NamedTuple):
    name: str
    hr_path: Path
    lr_path: Path | None  # None: the LR is made from the HR with imresize


class EvalImage(NamedTuple):
    name: str
    hr: np.ndarray  # uint8 HxWx3, as stored (not cropped)
    lr: np.ndarray  # uint8 (H//s)x(W//s)x3
    lr_source: Literal["file", "imresize"]


def find_pairs(dataset_dir: str | Path, scale: int) -> list[ImagePair]:
    """(name, HR path, LR path or None) for a benchmark-layout set or a plain folder of HR images."""
    scale = _check_scale(scale)
    root = Path(dataset_dir)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    if (root / "HR").is_dir():
        lr_dir = root / "LR_bicubic" / f"X{scale}"
        pairs = []
        for hr_path in list_images(root / "HR"):
            lr_path = lr_dir / f"{hr_path.stem}x{scale}.png"
            pairs.append(ImagePair(hr_path.stem, hr_path, lr_path if lr_path.is_file() else None))
        return pairs
    return [ImagePair(p.stem, p, None) for p in list_images(root)]


def load_pair(pair: ImagePair, scale: int) -> EvalImage:
    """Decode one pair; a missing LR is made by imresize of the mod-cropped HR."""
    hr = load_rgb_uint8(pair.hr_path)
    if min(hr.shape[:2]) < scale:
        raise UserError(f"{pair.hr_path} ({hr.shape[1]}x{hr.shape[0]}) is smaller than the scale {scale}")
    if pair.lr_path is None:
        return EvalImage(pair.name, hr, downscale(hr, scale), "imresize")
    lr = load_rgb_uint8(pair.lr_path)
    expected = (hr.shape[0] // scale, hr.shape[1] // scale)
    if lr.shape[:2] != expected:
        raise UserError(
            f"{pair.lr_path} is {lr.shape[1]}x{lr.shape[0]}, expected {expected[1]}x{expected[0]} "
            f"(HR {hr.shape[1]}x{hr.shape[0]} / {scale})"
        )
    return EvalImage(pair.name, hr, lr, "file")


def load_eval_set(dataset_dir: str | Path, scale: int) -> Iterator[EvalImage]:
    """Decode the pairs of `find_pairs` one at a time."""
    for pair in find_pairs(dataset_dir, scale):
        yield load_pair(pair, scale)


@dataclass(frozen=True)
class ImageScore:
    name: str
    psnr: float
    ssim: float
    lr_source: str


@dataclass(frozen=True)
class EvalResult:
    dataset: str
    scale: int
    crop_border: int
    psnr: float  # mean of per-image PSNR-Y (dB)
    ssim: float  # mean of per-image SSIM-Y
    images: list[ImageScore] = field(default_factory=list)
    convention: str = "Y BT.601 float, crop=scale, SR rounded to uint8, HR cropped top-left to SR size"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_image(sr: np.ndarray, hr: np.ndarray, scale: int) -> tuple[float, float]:
    """PSNR-Y and SSIM-Y of a float SR output against the uint8 HR (cropped to the SR size)."""
    if sr.ndim != 3 or sr.shape[2] != 3:
        raise ValueError(f"SR output must be HxWx3, got shape {sr.shape}")
    if sr.shape[0] > hr.shape[0] or sr.shape[1] > hr.shape[1]:
        raise ValueError(f"SR output {sr.shape[:2]} is larger than the HR image {hr.shape[:2]}")
    sr_uint8 = quantize(sr)
    gt = hr[: sr.shape[0], : sr.shape[1]]
    return psnr_y(sr_uint8, gt, scale), ssim_y(sr_uint8, gt, scale)


def evaluate(
    upscale_fn: UpscaleFn,
    dataset: str | Path | Sequence[EvalImage],
    scale: int,
    on_progress: ProgressFn | None = None,
    name: str | None = None,
) -> EvalResult:
    """Run `upscale_fn` on every LR image of a set and score it against the HR (method.md §6).

    `dataset` is a folder (`find_pairs`), or images already in memory (e.g. the validation images
    held out from a training set, scored at every validation of a run) named by `name`.
    """
    scale = _check_scale(scale)
    if isinstance(dataset, (str, Path)):
        pairs = find_pairs(dataset, scale)
        images: Iterator[EvalImage] | Sequence[EvalImage] = (load_pair(pair, scale) for pair in pairs)
        count, name = len(pairs), name or Path(dataset).name
    else:
        images, count, name = dataset, len(dataset), name or "images"
    scores = []
    for done, image in enumerate(images, start=1):
        sr = np.asarray(upscale_fn(image.lr))
        expected = (image.lr.shape[0] * scale, image.lr.shape[1] * scale, 3)
        if sr.shape != expected:
            raise ValueError(f"upscale_fn returned {sr.shape} for {image.name}, expected {expected}")
        psnr, ssim = score_image(sr, image.hr, scale)
        scores.append(ImageScore(image.name, psnr, ssim, image.lr_source))
        if on_progress is not None:
            on_progress(done, count)
    return EvalResult(
        dataset=name,
        scale=scale,
        crop_border=scale,
        psnr=float(np.mean([s.psnr for s in scores])),
        ssim=float(np.mean([s.ssim for s in scores])),
        images=scores,
    )


def load_images(paths: Sequence[Path], scale: int) -> list[EvalImage]:
    """Plain HR image files as an in-memory evaluation set (LR made by imresize)."""
    return [load_pair(ImagePair(path.stem, path, None), scale) for path in paths]


def holdout_split(paths: Sequence[Path], count: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(training, held out): `count` images drawn with `seed`, never more than a tenth of the set
    (at least one when the set has two or more; none from a single image). Both keep their order."""
    count = min(count, max(1, len(paths) // 10)) if len(paths) > 1 else 0
    chosen = set(np.random.default_rng([seed, 7]).choice(len(paths), size=count, replace=False).tolist())
    return (
        [p for i, p in enumerate(paths) if i not in chosen],
        [p for i, p in enumerate(paths) if i in chosen],
    )


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """The "bicubic" model: MATLAB imresize of the LR (as float in [0, 1]) by `scale`; float64, unclipped.

    Float (not uint8) resizing is what gives the reference figures (Set5 x2 33.678 dB).
    """
    return imresize(np.asarray(lr, dtype=np.float64) / 255.0, float(scale))


# ------------------------------------------------------------------------------------------ training


class PatchOrigin(NamedTuple):
    """Where a training patch came from: image index, LR top-left, and the augmentation applied."""

    image: int
    top: int
    left: int
    hflip: bool
    vflip: bool
    transpose: bool


def augment_pair(
    lr: np.ndarray, hr: np.ndarray, hflip: bool, vflip: bool, transpose: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Joint hflip, vflip, transpose (BasicSR `augment` order) on HxWxC patches."""
    if hflip:
        lr, hr = lr[:, ::-1], hr[:, ::-1]
    if vflip:
        lr, hr = lr[::-1], hr[::-1]
    if transpose:
        lr, hr = lr.transpose(1, 0, 2), hr.transpose(1, 0, 2)
    return lr, hr


class TrainImages:
    """All images of a training set in memory, with deterministic random aligned patch batches.

    - Images are decoded upright as uint8 RGB: gray is replicated to 3 channels, an alpha channel is
      dropped (not composited), 16-bit is rounded to 8-bit.
    - HR is mod-cropped to the scale and LR = imresize(HR, 1/scale) with uint8 rounding, exactly as
      the benchmark LR files were made.
    - An image is drawn with probability proportional to its number of patch positions (≈ area, so
      every pixel is about equally likely, as with DIV2K's fixed-size sub-images); images smaller than
      the patch are skipped and listed in `skipped`.
    - `batch(iteration)` depends only on (seed, iteration): a resumed run sees the same batches.
    - `rescales` adds, for each image, its MATLAB-bicubic downscales by these factors as further
      (HR, LR) pairs: the same scenes at other scales (more distinct patches, and inputs that the
      teacher labels like any other when its outputs are the targets). Listed in `names` as
      `<name>@<factor>`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        scale: int,
        lr_patch: int = 48,
        batch_size: int = 16,
        seed: int = 0,
        augment: bool = True,
        rescales: Sequence[float] = (),
    ) -> None:
        self.scale = _check_scale(scale)
        if any(not 0 < f < 1 for f in rescales):
            raise UserError(f"rescale factors must lie in (0, 1), got {list(rescales)}")
        if lr_patch < 1 or batch_size < 1:
            raise UserError(f"lr_patch and batch_size must be positive, got {lr_patch}, {batch_size}")
        self.lr_patch, self.batch_size, self.seed, self.augment = lr_patch, batch_size, seed, augment
        self.paths: list[Path] = []  # the images in use, in order (record them with the run)
        self.names: list[str] = []
        self.skipped: list[str] = []
        self.hr_images: list[np.ndarray] = []
        self.lr_images: list[np.ndarray] = []
        for path in map(Path, paths):
            image = load_rgb_uint8(path)
            for factor in (1.0, *rescales):
                resized = image if factor == 1.0 else imresize(image, factor)
                hr = mod_crop(resized, self.scale)
                name = path.name if factor == 1.0 else f"{path.name}@{factor:g}"
                if min(hr.shape[:2]) < lr_patch * self.scale:
                    self.skipped.append(name)
                    continue
                self.paths.append(path)
                self.names.append(name)
                self.hr_images.append(hr)
                self.lr_images.append(imresize(hr, 1.0 / self.scale))
        if not self.hr_images:
            raise UserError(
                f"no training image is at least {lr_patch * self.scale} px on its short side "
                f"(HR patch = LR patch {lr_patch} x scale {self.scale}); {len(self.skipped)} too small"
            )
        positions = np.array(
            [(lr.shape[0] - lr_patch + 1) * (lr.shape[1] - lr_patch + 1) for lr in self.lr_images]
        )
        self.image_probabilities = positions / positions.sum()

    @classmethod
    def from_folders(
        cls, folders: str | Path | Sequence[str | Path], scale: int, **kwargs: Any
    ) -> "TrainImages":
        """Every image directly inside one or more folders (sorted, folder by folder)."""
        folder_list = [folders] if isinstance(folders, (str, Path)) else list(folders)
        return cls([p for folder in folder_list for p in list_images(folder)], scale, **kwargs)

    def __len__(self) -> int:
        return len(self.hr_images)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch with one patch per image per epoch (BasicSR's per-item epoch)."""
        return max(1, math.ceil(len(self) / self.batch_size))

    def rng(self, iteration: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, iteration])

    def sample(self, iteration: int) -> tuple[np.ndarray, np.ndarray, list[PatchOrigin]]:
        """uint8 batches (N, p, p, 3) and (N, ps, ps, 3) plus where each patch came from."""
        rng = self.rng(iteration)
        p, s = self.lr_patch, self.scale
        lr_batch, hr_batch, origins = [], [], []
        for _ in range(self.batch_size):
            index = int(rng.choice(len(self), p=self.image_probabilities))
            lr_image, hr_image = self.lr_images[index], self.hr_images[index]
            top = int(rng.integers(0, lr_image.shape[0] - p + 1))
            left = int(rng.integers(0, lr_image.shape[1] - p + 1))
            # Drawn even without augmentation so that both settings consume the same random stream.
            hflip, vflip, transpose = (bool(f) and self.augment for f in rng.random(3) < 0.5)
            lr = lr_image[top : top + p, left : left + p]
            hr = hr_image[top * s : (top + p) * s, left * s : (left + p) * s]
            lr, hr = augment_pair(lr, hr, hflip, vflip, transpose)
            lr_batch.append(lr)
            hr_batch.append(hr)
            origins.append(PatchOrigin(index, top, left, hflip, vflip, transpose))
        return np.stack(lr_batch), np.stack(hr_batch), origins

    def crop_extra(self, extra: Sequence[np.ndarray], origins: Sequence[PatchOrigin]) -> np.ndarray:
        """HR-aligned patches of per-image HR-size arrays (e.g. cached teacher outputs), augmented alike."""
        if len(extra) != len(self):
            raise ValueError(f"extra has {len(extra)} arrays for {len(self)} training images")
        p, s = self.lr_patch, self.scale
        patches = []
        for origin in origins:
            array = extra[origin.image]
            if array.shape[:2] != self.hr_images[origin.image].shape[:2]:
                raise ValueError(
                    f"extra[{origin.image}] is {array.shape[:2]}, expected the HR size "
                    f"{self.hr_images[origin.image].shape[:2]}"
                )
            patch = array[origin.top * s : (origin.top + p) * s, origin.left * s : (origin.left + p) * s]
            patches.append(augment_pair(patch, patch, origin.hflip, origin.vflip, origin.transpose)[0])
        return np.stack(patches)

    @overload
    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def batch(
        self, iteration: int, extra: Sequence[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def batch(self, iteration: int, extra: Sequence[np.ndarray] | None = None) -> tuple[torch.Tensor, ...]:
        """(LR, HR) float32 NCHW tensors in [0, 1] for `iteration`; same seed and iteration, same batch.

        With `extra` (one float HxWx3 array per image at the HR size, e.g. cached teacher outputs) a
        third tensor holds the matching patches of those arrays, values as given (not divided by 255).
        The tensors are channels-last in memory (the patches' own HWC order, no transposing copy),
        the layout the training loops run their convolutions in.
        """
        lr, hr, origins = self.sample(iteration)
        if extra is None:
            return _to_tensor(lr).div_(255.0), _to_tensor(hr).div_(255.0)
        return (
            _to_tensor(lr).div_(255.0),
            _to_tensor(hr).div_(255.0),
            _to_tensor(self.crop_extra(extra, origins)),
        )


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) array -> float32 (N, C, H, W) tensor, channels-last in memory (a new tensor)."""
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2)
    return tensor.to(torch.float32, copy=True, memory_format=torch.channels_last)
