"""Recipes that say what they are, overrides as users type them, every entry point with every data recipe it can
use, and fast_dev_run as one batch of each stage (issue 31)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_augment import write_source

from miadpo import evaluate, generate, sft
from miadpo.augment import __main__ as augment_main
from miadpo.config import ENTRY_SCHEMAS as SCHEMAS
from miadpo.config import check_keys, check_recipe, config_dir, register_configs
from miadpo.models import build_adapter
from miadpo.select import __main__ as select_main
from miadpo.select.calibrate import threshold_overrides
from miadpo.train import train

# The data recipes each entry point can use: augment and select need a source to augment; train also reads pairs.
SOURCE_RECIPES = ["toy", "llava", "mix", "sequence", "grid", "pip"]
ENTRY_DATA = {"augment": SOURCE_RECIPES, "select": SOURCE_RECIPES,
              "train": [*SOURCE_RECIPES, "pairs", "synthetic"]}
README_COMMAND = ["data.pairs=/data/pairs.jsonl", "data.image_root=/data/images", "model=llava15",
                  "model.path=/models/llava-1.5-7b-hf", "trainer=gpu"]


def composed(entry: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=entry, overrides=overrides)


# ----- 1. recipes that say what they are ----------------------------------------------------------------------------
def test_the_readme_command_with_own_data_stops_under_the_toy_recipe_naming_the_recipes(tmp_path: Path) -> None:
    cfg = composed("train", README_COMMAND + [f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="data=toy is the toy demonstration") as error:
        train(cfg)
    message = str(error.value)
    assert "data.pairs=/data/pairs.jsonl" in message and "model=llava15" in message
    assert "data=pairs" in message and "data=llava, mix, sequence, grid or pip" in message
    assert not (tmp_path / "run").exists()  # stopped before anything ran


@pytest.mark.parametrize("overrides", [["data.source=/data/llava.json"], ["data.image_root=/data/images"],
                                       ["model=tiny_llava"], ["model=llava15"], ["data.mix=[{pairs: p.jsonl}]"]])
def test_own_data_or_model_under_the_toy_recipe_stops(overrides: list[str]) -> None:
    cfg = composed("train", overrides)
    with pytest.raises(ValueError, match="data=toy is the toy demonstration"):
        check_recipe(cfg.data, cfg.model)


def test_the_bare_default_is_the_toy_recipe_and_passes() -> None:
    cfg = composed("train", [])
    assert (cfg.data.name, cfg.model.name, cfg.optim.lr, cfg.dpo.sft_weight, cfg.trainer.max_epochs) == \
        ("toy", "toy_llava", 5e-4, 1.0, 4)
    check_recipe(cfg.data, cfg.model)
    # Toy experiments move the toy base and the output directory; still the toy recipe.
    moved = composed("train", ["model.path=/elsewhere/toy_base", "data.out_dir=/elsewhere/dpo",
                               "data.source=/elsewhere/toyworld/pool.json",
                               "data.image_root=/elsewhere/toyworld/images"])
    check_recipe(moved.data, moved.model)  # a toy world elsewhere (python -m miadpo.toyworld.base --out DIR)


def test_pairs_recipe_trains_on_the_readme_command_with_nothing_of_the_toy(tmp_path: Path) -> None:
    cfg = composed("train", ["data=pairs", *README_COMMAND])
    toy = composed("train", [])
    assert cfg.data.pairs == "/data/pairs.jsonl" and cfg.data.prepare == "pairs"
    assert (cfg.optim.lr, cfg.dpo.sft_weight, cfg.trainer.max_epochs, cfg.data.max_length) == (5e-5, 0.0, 1, None)
    assert cfg.selection.thresholds.sequence[2] == 0.8 and cfg.selection.right_answer_negatives == "none"
    assert cfg.selection.generation.max_new_tokens == 512 and cfg.eval.files == [] and cfg.eval.toy_source is None
    assert cfg.data.out_dir != toy.data.out_dir
    with pytest.raises(FileNotFoundError, match="data.pairs=/data/pairs.jsonl"):
        train(OmegaConf.merge(cfg, {"run_dir": str(tmp_path / "run")}))
    missing = composed("train", ["data=pairs", "model=tiny_llava", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="set data.pairs="):
        train(missing)


def test_a_null_max_length_is_the_model_configs_token_budget(tmp_path: Path) -> None:
    from miadpo.data.dataset import PairDataModule

    cfg = compose_train(["model.max_length=300"], tmp_path)
    assert cfg.data.max_length is None
    adapter = build_adapter(cfg.model)
    assert PairDataModule(cfg.data, adapter, adapter.collate, pairs=tmp_path / "pairs.jsonl").max_length == 300
    cfg.data.max_length = 128
    assert PairDataModule(cfg.data, adapter, adapter.collate, pairs=tmp_path / "pairs.jsonl").max_length == 128


def test_every_model_config_states_a_budget_that_fits_five_images() -> None:
    """Pretrained configs must set it (their base leaves it missing); tiny ones fit five of their images."""
    for path in sorted((Path(config_dir()) / "model").glob("*.yaml")):
        if path.stem.startswith("_"):
            continue
        model = composed("train", [f"model={path.stem}", "data=synthetic"]).model
        assert isinstance(model.max_length, int), path.name
        if model.path is None:
            adapter = build_adapter(model)
            prompt = "".join(f"Image{k}: <image>\n" for k in range(1, 6)) + "Which image shows a cat?"
            prompt_len, answer_len = adapter.count_tokens(prompt, "The third one. " * 20, [(640, 480)] * 5)
            assert prompt_len + answer_len <= model.max_length, (path.name, prompt_len + answer_len)
    assert composed("train", ["model=llava15", "data=mix"]).model.max_length >= 5 * 576


# ----- 2. the paper's recipes ----------------------------------------------------------------------------------------
def test_the_llava_experiment_has_the_official_scripts_settings() -> None:
    cfg = composed("train", ["experiment=mia_dpo_llava15"])
    lora = cfg.model.lora
    assert (cfg.model.name, lora.enabled, lora.r, lora.alpha, lora.dropout) == ("llava15", True, 128, 256, 0.05)
    assert (cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.sft_weight) == ("sigmoid", 0.1, 0.0)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (5e-5, 0.1, 0.0)
    effective = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices
    assert effective == 64 and cfg.trainer.max_epochs == 1 and cfg.trainer.precision == "bf16-mixed"
    assert (cfg.strategy.name, cfg.strategy.stage) == ("deepspeed", 2)
    assert cfg.model.gradient_checkpointing and cfg.model.freeze_projector and cfg.data.max_length == 4096
    text = (Path(config_dir()) / "experiment" / "mia_dpo_llava15.yaml").read_text()
    for line in ("M:37", "M:40", "M:21", "M:65", "M:56", "M:58", "M:38", "M:69", "M:64", "M:70", "M:55"):
        assert line in text, f"the experiment cites no source for {line}"


# ----- 4. overrides as users type them -------------------------------------------------------------------------------
def test_per_n_overrides_take_the_dotted_form() -> None:
    # An N the map lacks is a new entry: `+` adds it (a map's keys are counts, not fields: no typo to catch).
    cfg = composed("train", ["data=grid", "selection.thresholds.grid.4=0.4", "+selection.thresholds.sequence.6=0.3",
                             "data.augment.sequence.n_weights.5=0.9", "+data.augment.grid.records_per_grid.2=0.5"])
    assert cfg.selection.thresholds.grid[4] == 0.4 and cfg.selection.thresholds.grid[3] == 0.6  # others kept
    assert cfg.selection.thresholds.sequence[6] == 0.3
    assert cfg.data.augment.sequence.n_weights[5] == 0.9 and cfg.data.augment.grid.records_per_grid[2] == 0.5
    plain = OmegaConf.to_container(cfg.selection.thresholds, resolve=True)
    assert json.dumps(plain["grid"]) == json.dumps({2: 0.7, 3: 0.6, 4: 0.4, 5: 0.45, 6: 0.4, 7: 0.37, 8: 0.33,
                                                    9: 0.3})  # keys are ints: the cache keys are unchanged
    with pytest.raises(Exception, match="selection.thresholds.grid.x") as error:
        composed("train", ["selection.thresholds.grid.x=0.4"])
    assert "valid: [1, 2, 3" in str(error.value.__cause__)  # what Hydra prints under its message


def test_the_overrides_calibrate_prints_compose() -> None:
    line = threshold_overrides({"grid": {4: 0.41234}, "sequence": {2: 0.5, 5: 0.25}})
    assert line == ["selection.thresholds.grid.4=0.4123", "selection.thresholds.sequence.2=0.5000",
                    "selection.thresholds.sequence.5=0.2500"]
    cfg = composed("select", ["data=mix", *line])
    assert (cfg.selection.thresholds.grid[4], cfg.selection.thresholds.sequence[5]) == (0.4123, 0.25)


@pytest.mark.parametrize("entry", list(SCHEMAS))
def test_a_key_added_with_plus_fails_like_a_typo(entry: str) -> None:
    extra = ["+dpo.betta=0.1"] if entry == "train" else []
    cfg = composed(entry, ["+sedd=1", "+model.lora.rr=4", *extra] if entry not in ("augment",) else ["+sedd=1"])
    with pytest.raises(ValueError, match="unknown config key") as error:
        check_keys(cfg, SCHEMAS[entry])
    assert "'sedd'" in str(error.value)
    if entry != "augment":
        assert "'model.lora.rr'; did you mean 'model.lora.r'?" in str(error.value)
    if entry == "train":
        assert "'dpo.betta'; did you mean 'dpo.beta'?" in str(error.value)
    check_keys(composed(entry, []), SCHEMAS[entry])  # the entry's own composition passes


@pytest.mark.parametrize("module", [augment_main, select_main, evaluate, generate, sft])
def test_every_entry_point_stops_on_a_plus_typo(module, monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["miadpo", "+sedd=1", "prompt=x"] if module is generate else
                        ["miadpo", "+sedd=1"])
    with pytest.raises(SystemExit):
        module.main()
    assert "unknown config key 'sedd'" in capsys.readouterr().err


# ----- 5. every entry point with every data recipe it can use -----------------------------------------------------
@pytest.mark.parametrize("entry, data", [(e, d) for e, recipes in ENTRY_DATA.items() for d in recipes])
def test_every_entry_point_composes_with_every_data_recipe_it_can_use(entry: str, data: str) -> None:
    cfg = composed(entry, [f"data={data}"] + (["model=toy_llava"] if data == "toy" and entry == "select" else []))
    check_keys(cfg, SCHEMAS[entry])
    assert cfg.data.name == data
    if data == "toy":
        check_recipe(cfg.data, cfg.model if "model" in cfg else None)
        if "selection" in cfg:  # the toy selection settings: train's and select's are the same
            assert cfg.selection == composed("train", []).selection


def test_select_with_the_toy_recipe_and_another_model_names_the_toy_base() -> None:
    cfg = composed("select", ["data=toy"])
    with pytest.raises(ValueError, match="model=tiny_llava"):
        check_recipe(cfg.data, cfg.model)


def test_augment_runs_the_toy_recipe(tmp_path: Path, monkeypatch, capsys) -> None:
    """``python -m miadpo.augment data=toy`` (failed at composition): the toy splits, then its records."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["miadpo.augment", "data=toy", "data.augment.max_records=40"])
    augment_main.main()
    records = (tmp_path / "data" / "toyworld" / "dpo" / "records.jsonl").read_text().splitlines()
    assert len(records) == 40 and "records:" in capsys.readouterr().out


@pytest.mark.slow
def test_fast_dev_run_runs_one_batch_of_each_stage(tmp_path: Path, capsys) -> None:
    source = write_source(tmp_path / "source")
    out_dir = tmp_path / "data"
    cfg = compose_train(["data=sequence", f"data.source={source}", f"data.image_root={tmp_path / 'source' / 'images'}",
                         "trainer.fast_dev_run=true", "selection.generation.batch_size=4",
                         "selection.generation.max_new_tokens=4", "selection.thresholds.sequence.2=1.0",
                         "selection.thresholds.sequence.3=1.0", "selection.thresholds.sequence.4=1.0",
                         "selection.thresholds.sequence.5=1.0", "selection.min_perplexity=0", "data.val_fraction=0",
                         "eval.batch_size=2", f"eval.files=[{source}]",
                         f"eval.image_root={tmp_path / 'source' / 'images'}"], tmp_path)
    result = train(cfg)
    assert result.global_step == 1
    smoke = result.run_dir / "fast_dev_run"
    assert len((smoke / "records.jsonl").read_text().splitlines()) == 4  # one generation batch of records
    assert not out_dir.exists()  # the real data directory (caches) untouched
    evaluation = json.loads((result.run_dir / "eval_before_after.json").read_text())
    assert sum(int(row["n"]) for name, row in evaluation["before"].items() if "mean" not in name) == 2
    printed = capsys.readouterr().out
    for line in printed.splitlines():
        if line.startswith(("checkpoint:", "exported model:", "base weights:")):
            assert Path(line.split(":", 1)[1].strip()).exists(), line
