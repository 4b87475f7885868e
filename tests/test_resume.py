"""Resume from the checkpoint alone (issue 31): the run's composed config travels in its checkpoints; the command
line's overrides go on top; what would change the model, data, LoRA, loss or optimizer is refused before anything
runs; the resumed run writes a new run directory that names its parent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from omegaconf import open_dict
from safetensors.torch import load_file
from test_train import KillAt

from miadpo import train as train_entry
from miadpo.resume import RUN_CONFIG_KEY, resumed_config, stored_run
from miadpo.train import train

# A run unlike the default in its model, data, loss, optimizer and batch: resuming must restore each of these.
NON_DEFAULT = ["model=tiny_llava", "data=synthetic", "data.synthetic.num_pairs=24", "data.batch_size=4",
               "data.val_fraction=0", "dpo.beta=0.3", "dpo=ipo", "optim.lr=5e-3", "model.lora.r=4",
               "trainer.max_steps=9", "checkpoint.every_n_train_steps=2"]


def killed_run(tmp_path: Path) -> Path:
    """A NON_DEFAULT run killed in its first epoch (after step 5 of 6): its last checkpoint (step 4)."""
    with pytest.raises(RuntimeError, match="killed"):
        train(compose_train(NON_DEFAULT, tmp_path / "killed"), extra_callbacks=[KillAt(5)])
    last = tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    return last


def entry_point(args: list[str], cwd: Path, monkeypatch) -> None:
    """``python -m miadpo.train ARGS`` in this process, in ``cwd`` (Hydra's run directory under it)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["miadpo.train", *args])
    train_entry.main()


@pytest.mark.slow
def test_a_non_default_run_killed_mid_epoch_resumes_with_ckpt_path_alone(tmp_path: Path, monkeypatch) -> None:
    whole = train(compose_train(NON_DEFAULT, tmp_path / "whole"))
    last = killed_run(tmp_path)
    entry_point([f"ckpt_path={last}"], tmp_path, monkeypatch)
    (run_dir,) = (tmp_path / "outputs" / "train").iterdir()  # a new run directory, Hydra's default
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == whole.global_step == 9
    a = load_file(whole.exported / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
                                       ].shape[0] == 4  # model.lora.r=4 restored
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    parent = json.loads((run_dir / "resumed_from.json").read_text())
    assert parent["checkpoint"] == str(last.resolve())
    assert parent["parent_run_dir"] == str((tmp_path / "killed" / "run").resolve())
    # The resumed run's own checkpoints carry the restored config: a resume of the resume is the same run.
    restored = stored_run(run_dir / "checkpoints" / "last.ckpt")
    assert restored is not None and restored.config.dpo.beta == 0.3 and restored.config.dpo.loss == "ipo"


def composed_overrides(tmp_path: Path, overrides: list[str]):
    """(config, overrides, choices) as the entry point gets them for ``overrides`` typed on the command line."""
    from hydra import compose, initialize_config_dir

    from miadpo.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    task = list(cfg.hydra.overrides.task)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, task, choices


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("resume")
    return train(compose_train(NON_DEFAULT[:-1] + ["trainer.max_steps=2"], tmp_path)).checkpoint


def test_resumed_config_restores_the_run_and_puts_allowed_overrides_on_top(checkpoint: Path, tmp_path: Path) -> None:
    cfg, task, choices = composed_overrides(tmp_path, [f"ckpt_path={checkpoint}", "trainer.max_steps=7",
                                                       "logger=wandb", "eval.batch_size=3"])
    resumed = resumed_config(cfg, task, choices)
    assert (resumed.model.name, resumed.data.name, resumed.dpo.loss, resumed.dpo.beta, resumed.optim.lr,
            resumed.model.lora.r) == ("tiny_llava", "synthetic", "ipo", 0.3, 5e-3, 4)
    assert resumed.trainer.max_steps == 7 and resumed.logger.name == "wandb" and resumed.eval.batch_size == 3
    assert resumed.ckpt_path == str(checkpoint)


@pytest.mark.parametrize("override, named", [
    ("dpo.beta=0.5", "dpo.beta"), ("model=tiny_qwen2_vl", "model."), ("optim.lr=1e-4", "optim.lr"),
    ("model.lora.r=16", "model.lora.r"), ("data.batch_size=2", "data.batch_size"), ("seed=1", "seed"),
    ("experiment=mia_dpo_llava15", "experiment=mia_dpo_llava15"),
    ("~trainer.gradient_clip_val", "~trainer.gradient_clip_val"),
])
def test_a_resume_that_would_change_the_run_is_refused_naming_the_keys(checkpoint: Path, tmp_path: Path,
                                                                        override: str, named: str) -> None:
    cfg, task, choices = composed_overrides(tmp_path, [f"ckpt_path={checkpoint}", override])
    with pytest.raises(ValueError, match="would change") as error:
        resumed_config(cfg, task, choices)
    assert named in str(error.value)


def test_repeating_the_runs_own_overrides_is_accepted(checkpoint: Path, tmp_path: Path) -> None:
    cfg, task, choices = composed_overrides(tmp_path, [f"ckpt_path={checkpoint}", "dpo.beta=0.3", "optim.lr=5e-3"])
    assert resumed_config(cfg, task, choices).dpo.beta == 0.3


def test_a_composed_resume_is_checked_before_anything_runs(checkpoint: Path, tmp_path: Path) -> None:
    """Hydra's compose API (no command line to restore from): the config must be the checkpoint's run's."""
    other = compose_train(NON_DEFAULT[:-1] + ["dpo.beta=0.9", f"ckpt_path={checkpoint}"], tmp_path)
    with pytest.raises(ValueError, match="dpo.beta: 0.3 -> 0.9"):
        train(other)
    assert not (tmp_path / "run").exists()  # nothing ran
    same_dir = compose_train(NON_DEFAULT[:-1] + [f"ckpt_path={checkpoint}",
                                                 f"run_dir={checkpoint.parent.parent}"], tmp_path)
    same_dir.data.out_dir = str(checkpoint.parent.parent.parent / "data")
    with pytest.raises(ValueError, match="new run directory"):
        train(same_dir)


def test_a_checkpoint_of_an_earlier_version_restores_from_its_runs_hydra_config(checkpoint: Path,
                                                                                 tmp_path: Path) -> None:
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    state = torch.load(checkpoint, weights_only=False)
    (run / ".hydra" / "config.yaml").write_text(state.pop(RUN_CONFIG_KEY)["config"])
    torch.save(state, run / "checkpoints" / "last.ckpt")
    stored = stored_run(run / "checkpoints" / "last.ckpt")
    assert stored is not None and stored.config.dpo.beta == 0.3 and stored.source.endswith("config.yaml")
    torch.save(state, tmp_path / "loose.ckpt")
    cfg, task, choices = composed_overrides(tmp_path, [f"ckpt_path={tmp_path / 'loose.ckpt'}"])
    with pytest.raises(ValueError, match="holds no run config"):
        resumed_config(cfg, task, choices)
