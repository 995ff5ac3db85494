"""A small bundled sample set: colour photos shipped inside scikit-image, no download needed.

`sample_dir(cache_root)` writes them once as PNG HR images (long side <= 256 px, resized with the
MATLAB-compatible imresize, then cropped to a multiple of 12 so that x2, x3 and x4 all divide them) and
returns the folder, usable as an evaluation set or a training folder in tests and demos.
"""

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.imresize import imresize, mod_crop

SAMPLE_VERSION = "v1"  # bump when the recipe changes so that stale caches are not reused
MAX_SIDE = 256
CROP_MULTIPLE = 12


def _motorcycle() -> np.ndarray:
    from skimage import data

    return data.stereo_motorcycle()[0]


def _loaders() -> dict[str, Callable[[], np.ndarray]]:
    from skimage import data

    return {
        "astronaut": data.astronaut,
        "chelsea": data.chelsea,
        "coffee": data.coffee,
        "immunohistochemistry": data.immunohistochemistry,
        "motorcycle": _motorcycle,
        "rocket": data.rocket,
    }


SAMPLE_NAMES = ("astronaut", "chelsea", "coffee", "immunohistochemistry", "motorcycle", "rocket")


def sample_image(name: str, max_side: int = MAX_SIDE) -> np.ndarray:
    """One sample as uint8 RGB HxWx3, long side <= max_side, H and W multiples of 12."""
    image = np.asarray(_loaders()[name](), dtype=np.uint8)[..., :3]
    long_side = max(image.shape[:2])
    if long_side > max_side:
        image = imresize(image, max_side / long_side)
    return np.ascontiguousarray(mod_crop(image, CROP_MULTIPLE))


def sample_dir(cache_root: str | Path, max_side: int = MAX_SIDE) -> Path:
    """Folder of the sample PNGs under `cache_root`, written on first use (safe to call concurrently)."""
    folder = Path(cache_root) / f"skimage_sample_{SAMPLE_VERSION}_{max_side}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_NAMES:
        target = folder / f"{name}.png"
        if target.is_file():
            continue
        partial = folder / f".{name}.{os.getpid()}.tmp.png"
        Image.fromarray(sample_image(name, max_side)).save(partial, format="PNG")
        os.replace(partial, target)  # atomic: a reader never sees a half-written file
    return folder
