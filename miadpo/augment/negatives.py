"""Image-side negatives: an augmented record's images with only the asked-about image changed.

The augmentation knows the target and its companions, so it builds the negative beside the record
(``rejected_image``, the same shape as ``image``), which selection carries into the pair (``rejected_images``):

- Sequence / single: the target photograph replaced by another of the same source (``replace``), or by one of the
  record's other images (``companion``: the confusable image of an element-interference error), with no new file
  (the record names that photograph), or the target with Gaussian noise (``noise``; written under
  ``images/<fmt>_negative/``);
- Grid: the target tile's cell composed with the replacement (``companion``: another tile's image), or noise on
  the target tile;
- Pic-in-Pic: the centre picture's box filled with the replacement (resized to the box; ``companion``: the
  background photograph), or noise on the box.

Every other pixel stays that of the original composition (a JPEG re-encodes blocks that straddle the changed
region). Replacements are drawn per (seed, record id) from a generator of their own, so the plan of the records
themselves is the same with negatives on or off; the first drawn photograph whose pixels differ from the target's
is used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageChops

from miadpo.augment.formats import compose_grid
from miadpo.augment.noise import add_noise, record_rng
from miadpo.config import GridAugmentConfig, ImageNegativesConfig, NegativeKind


@dataclass
class NegativePlan:
    """How one record's negative is built: the kind, the replacement photographs to try (``replace``,
    ``companion``) and the seed of its noise (``noise``, with the record id)."""

    kind: str
    seed: int
    replacements: list[str] = field(default_factory=list)

    def noise_rng(self, record_id: str) -> np.random.Generator:
        """The noise generator of this negative: a function of the seed and ``record_id`` only."""
        return record_rng(self.seed, f"{record_id}:negative")


def plan_negative(cfg: ImageNegativesConfig, seed: int, record_id: str, index: int, pool: Sequence[str],
                  inputs: Sequence[str]) -> NegativePlan | None:
    """The negative of record ``record_id``, whose question asks about ``inputs[index]`` (None: off). Replacements,
    drawn by ``random.Random(f"{seed}:{record_id}:negative")``: with ``companion``, the record's other images in a
    random order first; then up to ``cfg.tries`` photographs of the same source (``pool``) outside the record's
    images."""
    kind = NegativeKind(cfg.kind)
    if kind is NegativeKind.none:
        return None
    if kind is NegativeKind.noise:
        return NegativePlan(kind.value, seed)
    used = set(inputs)
    others = [path for path in pool if path not in used]
    rng = random.Random(f"{seed}:{record_id}:negative")
    companions: list[str] = []
    if kind is NegativeKind.companion:
        companions = sorted({path for i, path in enumerate(inputs) if i != index and path != inputs[index]})
        rng.shuffle(companions)
    return NegativePlan(kind.value, seed, companions + rng.sample(others, min(cfg.tries, len(others))))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    """Whether two images have the same size and RGB pixels."""
    return a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


def negative_grid(images: Sequence[Image.Image], canvas: Image.Image, layout: dict, index: int,
                  replacement: Image.Image | None, plan: NegativePlan, record_id: str, cfg: GridAugmentConfig,
                  sigma: float) -> Image.Image:
    """The grid with tile ``index`` composed from ``replacement`` (fitted to its cell like any tile), or with noise
    on that tile."""
    if replacement is not None:
        return compose_grid([replacement if i == index else im for i, im in enumerate(images)], cfg)[0]
    return add_noise(canvas, sigma, layout["tiles"][index], plan.noise_rng(record_id))


def negative_pip(canvas: Image.Image, box: Sequence[int], replacement: Image.Image | None, plan: NegativePlan,
                 record_id: str, sigma: float) -> Image.Image:
    """The pic-in-pic with the centre box filled by ``replacement`` (resized to the box), or with noise on it."""
    if replacement is None:
        return add_noise(canvas, sigma, box, plan.noise_rng(record_id))
    x0, y0, x1, y1 = box
    out = canvas.copy()
    out.paste(replacement.convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC), (x0, y0))
    return out


def noisy_image(image: Image.Image, plan: NegativePlan, record_id: str, sigma: float) -> Image.Image:
    """``image`` with the negative's Gaussian noise (std ``sigma``) everywhere."""
    return add_noise(image, sigma, None, plan.noise_rng(record_id))

