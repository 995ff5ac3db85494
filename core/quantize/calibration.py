"""LR patches for int8 calibration, drawn from a model's training images (never from a reported set)."""

from __future__ import annotations

import numpy as np

from core.data.datasets import TrainImages


def calibration_patches(images: TrainImages, count: int, seed: int) -> np.ndarray:
    """`count` LR patches (count, 3, p, p) float32 in [0, 1], p = the images' LR patch size.

    Drawn like training batches (an image in proportion to its area, a uniform position), from their
    own seeded stream, so that calibration does not depend on how long the student trained.
    """
    rng = np.random.default_rng([seed, 17])
    p = images.lr_patch
    patches = []
    for _ in range(count):
        lr = images.lr_images[int(rng.choice(len(images), p=images.image_probabilities))]
        top = int(rng.integers(0, lr.shape[0] - p + 1))
        left = int(rng.integers(0, lr.shape[1] - p + 1))
        patches.append(lr[top : top + p, left : left + p])
    return np.stack(patches).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
