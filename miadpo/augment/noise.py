"""Seeded Gaussian noise on an image region: selection's corrupted inputs and the augmentation's noise negatives."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image


def add_noise(image: Image.Image, sigma: float, box: Sequence[float] | None, rng: np.random.Generator
              ) -> Image.Image:
    """Gaussian noise of std ``sigma`` inside ``box`` (or everywhere), in float, clipped to [0, 255]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    if box is None:
        region = (slice(None), slice(None))
    else:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        region = (slice(y0, y1), slice(x0, x1))
    patch = pixels[region]
    pixels[region] = patch + rng.normal(0.0, sigma, size=patch.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def record_rng(seed: int, record_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, record id): same noise whatever the batch or shard."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
