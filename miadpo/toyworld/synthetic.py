"""The embedded default data: multi-image preference pairs drawn in code, no download.

Each pair shows 2–4 images of the same shape in different colours and asks for the colour in one of them
("In Image2, what colour is the circle?"). The chosen answer names the target's colour; the rejected answer
names a distractor image's colour — the element-interference hallucination MIA-DPO targets. Images are
written under ``<data.out_dir>/synthetic/<fingerprint>/`` (a ``StageCache``: ``pairs.jsonl`` is its done marker,
written by the one process holding ``synthetic.lock``) and referenced with the composed-image prefix.
"""

from __future__ import annotations

import random
from dataclasses import fields
from pathlib import Path

from PIL import Image, ImageDraw

from miadpo.augment.formats import sequence_header
from miadpo.config import SyntheticConfig
from miadpo.data.pairs import ImageRoots, PairRecord, write_pairs
from miadpo.data.stage_cache import StageCache
from miadpo.fingerprint import synthetic_key
from miadpo.locks import StageLocked
from miadpo.toyworld.scenes import COLOURS as TOY_COLOURS
from miadpo.toyworld.scenes import SHAPES, paint_shape

WAIT_FOR_OTHER_WRITER_S = 600.0  # how long a process waits for another drawing the same pairs
# The toy world's palette plus two colours it does not use.
COLOURS: dict[str, tuple[int, int, int]] = {**TOY_COLOURS, "black": (20, 20, 20), "gray": (128, 128, 128)}


def draw_shape(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    """One shape of the given colour at a random position and scale on a white square image."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size * 2 // 3)
    x0, y0 = rng.randint(0, size - extent), rng.randint(0, size - extent)
    paint_shape(draw, shape, (x0, y0, x0 + extent, y0 + extent), colour)
    return image


def synthetic_cache(cfg: SyntheticConfig, roots: ImageRoots) -> StageCache:
    """The cache of the pairs ``cfg`` draws: ``<out_dir>/synthetic/<digest of the settings>/``."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(SyntheticConfig)}
    return StageCache.keyed(roots.out_dir / "synthetic", settings, synthetic_key,
                            what="the synthetic pairs", lock_name="synthetic.lock", done_name="pairs.jsonl")


def ensure_synthetic_pairs(cfg: SyntheticConfig, roots: ImageRoots) -> Path:
    """Generate the synthetic pair file (once per settings) and return its path."""
    if not 2 <= cfg.min_images <= cfg.max_images <= len(COLOURS):
        raise ValueError(f"synthetic images per pair must satisfy 2 <= min <= max <= {len(COLOURS)}")
    cache = synthetic_cache(cfg, roots)
    if not cache.is_done():
        try:
            with cache.writing():
                if not cache.is_done():  # another run may have finished it meanwhile
                    draw_pairs(cfg, roots, cache.directory)
        except StageLocked:  # another process is drawing them (ranks started together): its pairs are these
            cache.wait_until_done(WAIT_FOR_OTHER_WRITER_S, poll_s=0.5)
    return cache.done


def draw_pairs(cfg: SyntheticConfig, roots: ImageRoots, root: Path) -> None:
    """Draws the pairs' images into ``root/images`` and writes ``root/pairs.jsonl`` last."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    records = []
    for index in range(cfg.num_pairs):
        n_images = rng.randint(cfg.min_images, cfg.max_images)
        target = rng.randint(1, n_images)
        shape = rng.choice(SHAPES)
        colours = rng.sample(sorted(COLOURS), n_images)
        distractor = rng.choice([k for k in range(1, n_images + 1) if k != target])
        paths = []
        for k, colour in enumerate(colours, start=1):
            path = root / "images" / f"{index:05d}_{k}.png"
            draw_shape(shape, COLOURS[colour], cfg.image_size, rng).save(path)
            paths.append(roots.composed(path))
        records.append(
            PairRecord(
                id=f"synthetic-{index:05d}",
                images=paths,
                prompt=f"{sequence_header(n_images)}In Image{target}, what colour is the {shape}?",
                chosen=f"The {shape} is {colours[target - 1]}.",
                rejected=f"The {shape} is {colours[distractor - 1]}.",
                meta={"format": "sequence", "n_images": n_images, "target": target,
                      "source": "synthetic", "rejected_from_image": distractor},
            )
        )
    write_pairs(root / "pairs.jsonl", records)
