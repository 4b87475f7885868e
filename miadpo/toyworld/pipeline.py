"""The whole method on the toy world: base → augment → select → DPO → evaluate before/after.

Toy results cover the Sequence format with N = 2, 3 and 4 (56-px scenes are too small to stay legible as
grid tiles or as a pasted pic-in-pic at the tiny model's 56-px input).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from miadpo.evaluate import EvalItem, evaluate, llava_items, multi_image_mean
from miadpo.models import build_adapter
from miadpo.pairs import ImageRoots
from miadpo.toyworld.base import augmented_sequences, toy_model_config
from miadpo.toyworld.scenes import scene_index


def toy_test_items(out: Path, split: str = "test", seed: int = 7) -> tuple[list[EvalItem], dict[str, Any]]:
    """Single-image questions of a split plus its Sequence (N = 2–4) augmentation, with the scene index."""
    source = out / f"{split}.json"
    sequences = augmented_sequences(out, source, f"{split}_sequences", seed)
    single = llava_items(source, ImageRoots(out / "images", out))
    multi = llava_items(sequences, ImageRoots(out / "images", sequences.parent))
    return single + multi, scene_index(source)


def evaluate_model(model_dir: str | Path, out: Path, split: str = "test", batch_size: int = 32
                   ) -> dict[str, dict[str, float]]:
    adapter = build_adapter(toy_model_config(str(model_dir)))
    items, scenes = toy_test_items(out, split)
    table, _ = evaluate(adapter, items, batch_size=batch_size, max_new_tokens=4, scenes=scenes)
    table["multi-image mean"] = {"n": sum(r["n"] for g, r in table.items() if " N=" in g),
                                 "accuracy": multi_image_mean(table) or 0.0}
    return table


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
