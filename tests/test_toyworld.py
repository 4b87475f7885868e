"""Toy world data against its pixels, the evaluator on known predictions, SFT, and the staged base recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from miadpo.config import SFTJobConfig
from miadpo.eval.items import EvalItem
from miadpo.eval.scoring import score
from miadpo.models import build_adapter
from miadpo.sft import SFTModule, run_sft, sft_loaders
from miadpo.toyworld.base import build_base, cell_labels, toy_model_config
from miadpo.toyworld.errors import ToyErrors
from miadpo.toyworld.pipeline import SHIPPED_BASE
from miadpo.toyworld.scenes import ALL_QUESTIONS, COLOURS, COUNTS, SIZE, write_split


def test_answers_agree_with_the_rendered_pixels(tmp_path: Path) -> None:
    records = json.loads(write_split(tmp_path, "test", 200, seed=5, question_weights=ALL_QUESTIONS).read_text())
    kinds = set()
    for record in records:
        pixels = np.asarray(Image.open(tmp_path / "images" / record["image"]))
        question = record["conversations"][0]["value"]
        answer = record["conversations"][1]["value"]
        objects = record["toy"]["objects"]
        kind = record["toy"]["question_type"]
        kinds.add(kind)
        # Every object's colour is what the pixels show at its centre (all five shapes cover their centre).
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[obj["colour"]]
        # Objects sit in distinct quadrants, as their positions say.
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            left, top = (x0 + x1) / 2 < SIZE / 2, (y0 + y1) / 2 < SIZE / 2
            assert obj["position"] == f"{'top' if top else 'bottom'} {'left' if left else 'right'}"
        if kind == "colour":
            position = question.split("at the ")[1].rstrip("?")
            obj = next(o for o in objects if o["position"] == position)
            x0, y0, x1, y1 = obj["box"]
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[answer]
        elif kind == "count":
            non_white = (pixels != 255).any(axis=2)
            quadrants = [non_white[r : r + SIZE // 2, c : c + SIZE // 2].any() for r in (0, 28) for c in (0, 28)]
            assert COUNTS[sum(quadrants)] == answer
        elif kind == "presence":
            colour, shape = question[len("<image>\nIs there a ") :].rstrip("?").split(" ")
            visible = {tuple(pixels[(o["box"][1] + o["box"][3]) // 2, (o["box"][0] + o["box"][2]) // 2])
                       for o in objects if o["shape"] == shape}
            assert (COLOURS[colour] in visible) == (answer == "yes")
    assert kinds == {"colour", "shape", "position", "count", "presence"}


def test_splits_from_different_seeds_differ(tmp_path: Path) -> None:
    a = json.loads(write_split(tmp_path / "a", "train", 20, seed=1).read_text())
    b = json.loads(write_split(tmp_path / "b", "val", 20, seed=2).read_text())
    assert [r["toy"] for r in a] != [r["toy"] for r in b]


def test_cell_labels_follow_the_boxes() -> None:
    objects = [{"box": (0, 0, 27, 27), "colour": "red", "shape": "square"}]
    colours, shapes = cell_labels(objects, grid=4, cell=14.0)
    assert colours[:2] == [1 + sorted(COLOURS).index("red")] * 2 and colours[2] == 0 and colours[4] != 0
    assert sum(1 for s in shapes if s) == 4


def item(group: str, answer: str, paths: list[str], target: int = 1) -> EvalItem:
    return EvalItem(id=answer, group=group, sources=[], prompt="", answer=answer, image_paths=paths, target=target)


def test_scoring_known_predictions_with_error_classes() -> None:
    scenes = {"a.png": [{"colour": "red", "shape": "circle", "position": "top left"}],
              "b.png": [{"colour": "blue", "shape": "circle", "position": "top right"}]}
    items = [item("sequence N=2", "red", ["a.png", "b.png"]) for _ in range(4)] + [item("single", "red", ["a.png"])]
    predictions = ["Red.", "blue", "green", "circle", "red"]
    table = score(items, predictions, ToyErrors(scenes))
    row = table["sequence N=2"]
    assert row["n"] == 4 and row["accuracy"] == 25.0
    assert row["distractor %"] == 25.0 and row["in no image %"] == 25.0 and row["other %"] == 25.0
    assert table["single"]["accuracy"] == 100.0


def sft_config(tmp_path: Path, files: list[str], epochs: int) -> SFTJobConfig:
    cfg = OmegaConf.structured(SFTJobConfig)
    cfg.model = toy_model_config()
    cfg.data.merge_with({"files": files, "image_root": str(tmp_path / "images"), "out_dir": str(tmp_path),
                         "batch_size": 16, "max_length": 256})
    cfg.optim.lr = 1e-3
    cfg.trainer = {"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                   "enable_model_summary": False}
    cfg.run_dir = str(tmp_path / "sft")
    return cfg  # type: ignore[return-value]


@pytest.mark.slow
def test_short_sft_lowers_the_answer_loss(tmp_path: Path) -> None:
    source = write_split(tmp_path, "train", 96, seed=3)
    cfg = sft_config(tmp_path, [str(source)], epochs=4)
    adapter = build_adapter(cfg.model)
    loader, _ = sft_loaders(adapter, cfg.data, seed=0)
    batch = next(iter(loader))
    with torch.no_grad():
        before = SFTModule(adapter, cfg.optim).model(**batch).loss.item()
    exported = run_sft(cfg, adapter)
    reloaded = build_adapter(toy_model_config(str(exported)))
    with torch.no_grad():
        after = reloaded.model(**batch).loss.item()
    assert after < before - 0.5


def base_command_defaults() -> dict:
    """The settings `python -m miadpo.toyworld.base` runs with when given no flags."""
    from unittest import mock

    from miadpo.toyworld import base

    with mock.patch.object(base, "build_base", autospec=True, return_value=Path(".")) as build:
        base.main([])
    names = ["out", "train_scenes", "eval_scenes", "multi_share", "vision_epochs", "sft_epochs", "lr"]
    return {**dict(zip(names, build.call_args.args)), **build.call_args.kwargs}


@pytest.mark.slow
def test_base_recipe_runs_at_small_scale(tmp_path: Path) -> None:
    """The regeneration command of the shipped checkpoint, with its defaults, at a small scale."""
    shipped = json.loads((SHIPPED_BASE / "base_recipe.json").read_text())
    base = build_base(tmp_path, train_scenes=64, eval_scenes=8, vision_epochs=1, sft_epochs=1, progress=False)
    recipe = json.loads((tmp_path / "base_recipe.json").read_text())
    assert recipe["multi_records"] > 0 and 0 <= recipe["vision_patch_accuracy"] <= 1
    # The command's defaults are the shipped recipe (only the scale was changed here).
    for key in ("multi_share", "lr", "batch_size", "seed"):
        assert recipe[key] == shipped[key], key
    assert {k: recipe["model"][k] for k in shipped["model"]} == shipped["model"]
    command = base_command_defaults()
    for key in ("train_scenes", "eval_scenes", "multi_share", "vision_epochs", "sft_epochs", "lr", "seed"):
        assert command[key] == shipped[key], key
    adapter = build_adapter(toy_model_config(str(base)))
    shipped_config = json.loads((SHIPPED_BASE / "config.json").read_text())
    assert adapter.base_model.config.text_config.num_hidden_layers == shipped_config["text_config"]["num_hidden_layers"]
    assert (tmp_path / "test.json").is_file() and (tmp_path / "train_sequences" / "records.jsonl").is_file()


@pytest.mark.parametrize("bad", ['[{"id": 1, "conversations": []}]'])
def test_sft_reader_counts_bad_records(tmp_path: Path, bad: str) -> None:
    source = write_split(tmp_path, "train", 10, seed=3)
    broken = tmp_path / "broken.json"
    broken.write_text(bad)
    cfg = sft_config(tmp_path, [str(source), str(broken)], epochs=1)
    cfg.data.max_bad_fraction = 0.5
    loader, _ = sft_loaders(build_adapter(cfg.model), cfg.data, seed=0)
    assert len(loader.dataset) == 10


@pytest.mark.slow
def test_whole_toy_pipeline_at_small_scale(tmp_path: Path) -> None:
    """Base → augment → select → DPO → before/after evaluation, through the real entry config."""
    from conftest import compose_train

    from miadpo.toyworld.pipeline import ensure_toy_world
    from miadpo.train import train

    out = tmp_path / "toyworld"
    build_base(out, train_scenes=64, eval_scenes=12, multi_share=0.25, vision_epochs=1, sft_epochs=1,
               progress=False)
    ensure_toy_world(out, out / "base")  # existing base: only the evaluation sequences are added
    assert (out / "test_sequences" / "records.jsonl").is_file()
    # The DPO source is a pool of fresh scenes, as many as the base's train split and none of them.
    train_scenes = json.loads((out / "train.json").read_text())
    pool_scenes = json.loads((out / "pool.json").read_text())
    assert len(pool_scenes) == len(train_scenes)
    assert not {json.dumps(r["toy"]) for r in pool_scenes} & {json.dumps(r["toy"]) for r in train_scenes}
    overrides = ["model=toy_llava", f"model.path={out / 'base'}", "data=toy", f"data.source={out / 'pool.json'}",
                 f"data.image_root={out / 'images'}", f"data.out_dir={out / 'dpo'}", "data.augment.max_records=40",
                 "selection.generation.max_new_tokens=4", "selection.generation.min_new_tokens=1",
                 "selection.min_perplexity=0",
                 "selection.thresholds.sequence={2:1,3:1,4:1,5:1}", "selection.post.perplexity_max=null",
                 "data.val_fraction=0", "trainer.max_steps=3", "seed=0",
                 f"eval.files=[{out / 'test.json'},{out / 'test_sequences' / 'records.jsonl'}]",
                 f"eval.toy_source={out / 'test.json'}", f"eval.image_root={out / 'images'}", "logger=wandb"]
    result = train(compose_train(overrides, tmp_path))
    assert list((result.wandb_run / "files" / "media" / "table" / "eval").glob("before_after_*.table.json"))
    tables = json.loads((result.run_dir / "eval_before_after.json").read_text())
    assert set(tables) == {"before", "after", "paired", "skipped"}
    assert tables["skipped"] == []
    paired = tables["paired"]["single"]
    assert paired["accuracy_a"] == tables["before"]["single"]["accuracy"]
    assert paired["accuracy_b"] == tables["after"]["single"]["accuracy"]
    assert paired["low"] <= paired["delta"] <= paired["high"]
    assert {"single", "multi-image mean"} <= set(tables["after"])
    assert any(group.startswith("sequence N=") for group in tables["after"])
    assert "in no image %" in tables["after"]["single"]
    # Augmented at the base's own seed, every DPO record is built from pool scenes only.
    dpo_records = [json.loads(r) for r in (out / "dpo" / "records.jsonl").read_text().splitlines()]
    assert dpo_records and all(i.startswith("toy/pool/") for r in dpo_records for i in r["image"])
    assert Path(compose_train(["data=toy"], tmp_path).data.source).name == "pool.json"  # the shipped recipe


def test_ablation_evaluation_cache_misses_for_a_model_retrained_in_place(tmp_path: Path) -> None:
    """An arm retrained into the same directory (another recipe, same file names and sizes) is evaluated again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "toyworld_run", Path(__file__).resolve().parents[1] / "experiments" / "toyworld" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    model = tmp_path / "MIA-DPO-seed0" / "model"
    model.mkdir(parents=True)
    weights = model / "model.safetensors"

    def key(split: str = "test") -> str:
        cfg = run.compose_config("evaluate", ["model=toy_llava", f"model.path={model}",
                                              *run.split_overrides("data/toyworld", split)])
        return run.evaluation_key(cfg, 6)

    weights.write_bytes(b"\x00" * 64)
    first = key()
    assert key() == first
    weights.write_bytes(b"\x01" * 64)  # same name, same size, other weights
    assert key() != first
    weights.write_bytes(b"\x00" * 64)
    assert key() == first and key("val") != first
