"""The toy base model: a small LLaVA trained in stages so that it has a weak, non-trivial multi-image ability.

    python -m miadpo.toyworld.base --out data/toyworld [--train-scenes 6000 --multi-share 0.4 ...]

With the defaults this regenerates the checkpoint shipped in ``miadpo/toyworld/base_model`` (~15 min on 2 cores).

Stages (all seeded):
1. data: toy train/val/test splits from disjoint seeds; the train split is augmented into Sequence records
   (N = 2–4) by the normal augmentation stage;
2. vision pretraining: the CLIP tower learns per-patch colour and shape labels (linear heads on the feature
   layer the projector reads), because LM supervision alone leaves a random tower stuck at "ignore the image";
3. SFT (``miadpo.sft``): projector + LLM trained, tower frozen, on the single-image train split plus a share
   of multi-image Sequence records (``multi_share``, 40%) — a weak multi-image ability for DPO to sharpen;
4. export: a standard transformers directory ``<out>/base`` (the base and reference of DPO).
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn

from miadpo.augment.runner import RECORDS_FILE, run_augmentation
from miadpo.config import DataConfig, ModelConfig, SFTJobConfig
from miadpo.models import build_adapter
from miadpo.models.base import ModelAdapter
from miadpo.sft import run_sft
from miadpo.toyworld.scenes import COLOURS, SHAPES, SIZE, write_split

TOY_MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_layers": 6, "num_heads": 4,
             "vision_hidden_size": 64, "vision_layers": 2, "image_size": SIZE, "patch_size": 14, "vocab_size": 512}
# ``pool``: scenes the base never sees (as many as the train split), the source of the toy DPO records. Drawing
# them from the train split instead made a DPO run at the base's own seed re-augment, record for record, the
# Sequence records the base was fine-tuned on (seed 0: base accuracy 67% on them against 59% on fresh ones).
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000, "pool": 4000}


def toy_model_config(path: str | None = None, llm_layers: int | None = None) -> ModelConfig:
    """The ``toy_llava`` model config (``TOY_MODEL``, ``llm_layers`` decoder layers if given; tower frozen, no LoRA),
    its weights read from ``path`` (None: the model is built in code)."""
    cfg = OmegaConf.structured(ModelConfig)
    tiny = {**TOY_MODEL, **({"num_layers": llm_layers} if llm_layers else {})}
    cfg.merge_with({"name": "toy_llava", "path": path, "tiny": tiny, "lora": {"enabled": False},
                    "freeze_vision_tower": True, "freeze_projector": False, "freeze_llm": False})
    return cfg  # type: ignore[return-value]


def write_splits(out: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """Each split of ``sizes`` written under ``out`` (that many scenes, from its ``SPLIT_SEEDS`` seed): its JSON's path,
    by split."""
    return {split: write_split(out, split, sizes[split], SPLIT_SEEDS[split]) for split in sizes}


def augmented_sequences(out: Path, source: Path, name: str, seed: int) -> Path:
    """Sequence records (N = 2–4) of a toy split, through the normal augmentation stage."""
    data = OmegaConf.structured(DataConfig(source=str(source), image_root=str(out / "images"),
                                           out_dir=str(out / name)))
    data.formats = {"sequence": 1.0, "grid": 0.0, "pip": 0.0}
    data.augment.sequence.n_weights = {2: 1.0, 3: 1.0, 4: 1.0, 5: 0.0}
    data.augment.known_sources = ["toy"]
    data.augment.workers = 1  # small splits: no pool start-up
    run_augmentation(data, seed, progress=False)
    return out / name / RECORDS_FILE


def cell_labels(objects: list[dict[str, Any]], grid: int, cell: float) -> tuple[list[int], list[int]]:
    """Per-cell colour and shape class (0 = background) from the scene: the object covering the cell centre."""
    colours, shapes = [], []
    for row in range(grid):
        for col in range(grid):
            cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
            hit = next((o for o in objects if o["box"][0] <= cx <= o["box"][2] and o["box"][1] <= cy <= o["box"][3]),
                       None)
            colours.append(0 if hit is None else 1 + sorted(COLOURS).index(hit["colour"]))
            shapes.append(0 if hit is None else 1 + SHAPES.index(hit["shape"]))
    return colours, shapes


def pretrain_vision(adapter: ModelAdapter, source: Path, image_root: Path, epochs: int, lr: float = 2e-3,
                    batch_size: int = 64, seed: int = 0) -> float:
    """Train the vision tower on per-patch colour/shape labels; returns the final patch accuracy."""
    from PIL import Image

    records = json.loads(source.read_text())
    vision = adapter.module_groups()["vision_tower"]
    config = adapter.base_model.config
    grid = config.vision_config.image_size // config.vision_config.patch_size
    hidden = config.vision_config.hidden_size
    heads = nn.ModuleDict({"colour": nn.Linear(hidden, len(COLOURS) + 1), "shape": nn.Linear(hidden, len(SHAPES) + 1)})
    pixels = adapter.process_images([Image.open(image_root / r["image"]).convert("RGB") for r in records]).pixel_values
    labels = [cell_labels(r["toy"]["objects"], grid, SIZE / grid) for r in records]
    colour_labels = torch.tensor([c for c, _ in labels])
    shape_labels = torch.tensor([s for _, s in labels])
    params = list(vision.parameters()) + list(heads.parameters())
    for p in vision.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    vision.train()
    accuracy = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(records), generator=generator)
        correct = total = 0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            states = vision(pixel_values=pixels[index], output_hidden_states=True).hidden_states
            features = states[config.vision_feature_layer][:, 1:]  # the layer the projector reads, CLS dropped
            colour_logits, shape_logits = heads["colour"](features), heads["shape"](features)
            loss = nn.functional.cross_entropy(colour_logits.flatten(0, 1), colour_labels[index].flatten()) + \
                nn.functional.cross_entropy(shape_logits.flatten(0, 1), shape_labels[index].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((colour_logits.argmax(-1) == colour_labels[index]).sum())
            total += colour_labels[index].numel()
        accuracy = correct / total
    vision.eval()
    return accuracy


def build_base(out: Path, train_scenes: int = 6000, eval_scenes: int = 1000, multi_share: float = 0.4,
               vision_epochs: int = 6, sft_epochs: int = 6, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
               progress: bool = True, llm_layers: int | None = None) -> Path:
    """Run every stage; returns the exported base model directory ``<out>/base``."""
    L.seed_everything(seed)
    out = Path(out)
    splits = write_splits(out, {"train": train_scenes, "val": eval_scenes, "test": eval_scenes})
    multi = augmented_sequences(out, splits["train"], "train_sequences", seed)

    adapter = build_adapter(toy_model_config(llm_layers=llm_layers))
    patch_accuracy = pretrain_vision(adapter, splits["train"], out / "images", vision_epochs, seed=seed)

    records = [json.loads(line) for line in multi.read_text().splitlines()]
    random.Random(seed).shuffle(records)
    keep = int(multi_share / (1 - multi_share) * train_scenes) if multi_share < 1 else len(records)
    mix = out / "sft_multi.jsonl"
    mix.write_text("".join(json.dumps(r) + "\n" for r in records[:keep]))

    cfg = OmegaConf.structured(SFTJobConfig)
    cfg.model = toy_model_config(llm_layers=llm_layers)
    cfg.data.merge_with({"files": [str(splits["train"]), str(mix)], "image_root": str(out / "images"),
                         "out_dir": str(out / "train_sequences"), "batch_size": batch_size, "max_length": 512})
    cfg.optim.lr = lr
    cfg.trainer = {"max_epochs": sft_epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": progress,
                   "enable_model_summary": False, "gradient_clip_val": 1.0}
    cfg.run_dir = str(out / "sft")
    exported = run_sft(cfg, adapter)
    base = out / "base"
    if base.exists():
        import shutil

        shutil.rmtree(base)
    exported.rename(base)
    (out / "base_recipe.json").write_text(json.dumps({
        "train_scenes": train_scenes, "eval_scenes": eval_scenes, "multi_share": multi_share,
        "multi_records": keep, "vision_epochs": vision_epochs, "vision_patch_accuracy": patch_accuracy,
        "sft_epochs": sft_epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "model": dict(cfg.model.tiny),
    }, indent=2) + "\n")
    return base


def main(argv: list[str] | None = None) -> None:
    """The command line: build the toy base model (``build_base``) and print its directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/toyworld")
    # The command's defaults are build_base's (those of the shipped checkpoint).
    defaults = {name: p.default for name, p in inspect.signature(build_base).parameters.items()}
    for name in ("train_scenes", "eval_scenes", "multi_share", "vision_epochs", "sft_epochs", "lr", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(defaults[name]), default=defaults[name])
    parser.add_argument("--llm-layers", type=int, default=None, help="decoder layers (default 6)")
    args = parser.parse_args(argv)
    base = build_base(Path(args.out), args.train_scenes, args.eval_scenes, args.multi_share, args.vision_epochs,
                      args.sft_epochs, args.lr, seed=args.seed, llm_layers=args.llm_layers)
    print(f"toy base model: {base.resolve()}")


if __name__ == "__main__":
    main()
