"""Your own model and data, part 2 (issue 32): what a job reads is named before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train

from miadpo import pipeline
from miadpo.models import ModelWeightsNotFoundError
from miadpo.train import train


@pytest.fixture
def no_model(monkeypatch) -> None:
    """Building a model fails the test: every check below must stop the job before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was named")
    monkeypatch.setattr(pipeline, "build_adapter", refuse)


def test_a_missing_source_is_named_before_any_model_loads(tmp_path: Path, no_model) -> None:
    cfg = compose_train(["data=grid", f"data.source={tmp_path / 'nope.json'}", f"data.image_root={tmp_path}"],
                        tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data.source=.*nope.json \(data=grid\): no such file"):
        train(cfg)


def test_a_missing_image_root_is_named_before_any_model_loads(tmp_path: Path, no_model) -> None:
    source = tmp_path / "llava.json"
    source.write_text("[]")
    cfg = compose_train(["data=mix", f"data.source={source}", f"data.image_root={tmp_path / 'photos'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data.image_root=.*photos \(data=mix, where the images of"):
        train(cfg)


def test_a_missing_weights_directory_is_named_before_anything_runs(tmp_path: Path, no_model) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    cfg = compose_train(["data=pairs", f"data.pairs={pairs}", "model=llava15", f"model.path={tmp_path / 'llava'}"],
                        tmp_path)
    with pytest.raises(ModelWeightsNotFoundError, match="huggingface-cli download"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_the_toy_model_and_its_evaluation_set_work_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    """``python -m miadpo.evaluate model=toy_llava eval=toy`` in a fresh directory: the shipped base is copied and the
    toy splits generated on first use (it failed: "weights not found at model.path='data/toyworld/base'")."""
    import sys

    from miadpo import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["miadpo.evaluate", "model=toy_llava", "eval=toy",
                                      "eval.files=[data/toyworld/test.json]", "eval.progress=false",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    evaluate.main()
    assert (tmp_path / "data" / "toyworld" / "base" / "config.json").is_file()
    assert (tmp_path / "run" / "eval.json").is_file()


def test_a_mistyped_toy_model_path_stops_instead_of_getting_the_base(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from miadpo.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[f"model.path={tmp_path / 'runs' / 'typo' / 'model'}",
                                                        "prompt=x"])
    with pytest.raises(FileNotFoundError, match="copies the shipped toy base only into a missing directory named"):
        pipeline.prepare_model(cfg.model)
    assert not (tmp_path / "runs").exists()
    cfg.model.path = str(tmp_path / "toyworld" / "base")
    pipeline.prepare_model(cfg.model)
    assert (tmp_path / "toyworld" / "base" / "config.json").is_file()
