"""The whole method on the toy world: base → augment → select → DPO → evaluate before/after.

Toy results cover the Sequence format with N = 2, 3 and 4 (56-px scenes are too small to stay legible as
grid tiles or as a pasted pic-in-pic at the tiny model's 56-px input).
"""

from __future__ import annotations

import json
from pathlib import Path

from miadpo.toyworld.base import augmented_sequences

SHIPPED_BASE = Path(__file__).resolve().parent / "base_model"


def ensure_toy_world(base_dir: str | Path) -> Path:
    """Make ``<out>/base`` (``base_dir``) and the toy splits exist; ``out`` is the base's parent directory.

    The splits are regenerated from their seeds when missing; the base is copied from the checkpoint shipped
    with the package (made by ``python -m miadpo.toyworld.base``) or, without one, trained and cached.
    """
    import shutil

    from miadpo.toyworld.base import SPLIT_SEEDS, build_base
    from miadpo.toyworld.scenes import write_split

    base_dir = Path(base_dir)
    out = base_dir.parent
    recipe = json.loads((SHIPPED_BASE / "base_recipe.json").read_text()) if SHIPPED_BASE.is_dir() else None
    if not base_dir.is_dir():
        if recipe is None:
            build_base(out)
        else:
            shutil.copytree(SHIPPED_BASE, base_dir)
    recipe = recipe or json.loads((out / "base_recipe.json").read_text())
    sizes = {"train": recipe["train_scenes"], "val": recipe["eval_scenes"], "test": recipe["eval_scenes"]}
    for split, count in sizes.items():
        if not (out / f"{split}.json").is_file():
            write_split(out, split, count, SPLIT_SEEDS[split])
    for split in ("val", "test"):
        augmented_sequences(out, out / f"{split}.json", f"{split}_sequences", seed=7)
    return base_dir
