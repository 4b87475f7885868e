"""The whole method on the toy world: base → augment → select → DPO → evaluate before/after.

Toy results cover the Sequence format with N = 2, 3 and 4 (56-px scenes are too small to stay legible as
grid tiles or as a pasted pic-in-pic at the tiny model's 56-px input).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from miadpo.toyworld.base import SPLIT_SEEDS, augmented_sequences, build_base
from miadpo.toyworld.scenes import write_split

SHIPPED_BASE = Path(__file__).resolve().parent / "base_model"


def ensure_toy_world(out: str | Path, base_dir: str | Path | None = None) -> Path:
    """Make the toy splits under ``out`` exist and, with ``base_dir``, the toy base model there.

    Splits: ``train`` (what the base was trained on), ``val`` and ``test`` (evaluation, with their Sequence
    questions) and ``pool`` (fresh scenes, as many as ``train``, that the DPO recipe augments).

    The splits are regenerated from their seeds when missing; the base is copied from the checkpoint shipped
    with the package (made by ``python -m miadpo.toyworld.base``) or, without one, trained and cached in ``out``.
    """
    out = Path(out)
    if base_dir is not None:
        ensure_toy_base(base_dir, out)
    # Split sizes: those of a base built here, else those the shipped base was trained with.
    recipe_file = next(f for f in (out / "base_recipe.json", SHIPPED_BASE / "base_recipe.json") if f.is_file())
    recipe = json.loads(recipe_file.read_text())
    sizes = {"train": recipe["train_scenes"], "val": recipe["eval_scenes"], "test": recipe["eval_scenes"],
             "pool": recipe["train_scenes"]}
    for split, count in sizes.items():
        path = out / f"{split}.json"
        if not path.is_file() or len(json.loads(path.read_text())) != count:
            # Missing, or written for another recipe's split size: regenerate it and its augmented questions.
            shutil.rmtree(out / f"{split}_sequences", ignore_errors=True)
            write_split(out, split, count, SPLIT_SEEDS[split])
    for split in ("val", "test"):
        augmented_sequences(out, out / f"{split}.json", f"{split}_sequences", seed=7)
    return out


def ensure_toy_base(base_dir: str | Path, out: str | Path) -> Path:
    """Copy the shipped toy base to ``base_dir`` if it is not there (without a shipped one, train it in ``out``)."""
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        if SHIPPED_BASE.is_dir():
            shutil.copytree(SHIPPED_BASE, base_dir)
        else:
            shutil.move(build_base(Path(out)), base_dir)
    return base_dir
