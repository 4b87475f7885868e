"""Resuming a training run from its checkpoint alone: ``python -m miadpo.train ckpt_path=<run>/checkpoints/last.ckpt``.

Every checkpoint carries the run's composed config (as composed, before any stage ran) with its config-group
choices and run directory (``StoreRunConfig``). ``resumed_config`` restores that config and puts the command
line's overrides on top, as a composition would; only what cannot change the trained weights' meaning may differ
from the parent run (``RESUMABLE``: how long to train, logging, checkpointing, evaluation, where to write). A
checkpoint from an earlier version is read with its run's ``.hydra/config.yaml``. ``check_resume`` holds a config
composed by other means (Hydra's compose API) to the same rule, and ``record_parent`` writes
``<run_dir>/resumed_from.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from miadpo.config import TrainConfig

RUN_CONFIG_KEY = "miadpo_run_config"
# What a resumed run may change: training length, progress display and logging, checkpointing, the evaluation
# around training, where it writes (its data and caches are keyed by content: another out_dir remakes the same
# ones), data loader workers and which checkpoint it starts from.
RESUMABLE = ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "trainer.enable_progress_bar",
             "trainer.enable_model_summary", "trainer.log_every_n_steps", "logger", "checkpoint", "eval", "run_dir",
             "data.out_dir", "data.num_workers", "ckpt_path")


@dataclass
class StoredRun:
    """A checkpoint's run: its composed config, its config-group choices (None when unknown) and its directory."""

    config: DictConfig
    choices: dict[str, Any] | None
    run_dir: Path | None
    source: str  # where it was read


class StoreRunConfig(L.Callback):
    """Writes the run's composed config, choices and directory into every checkpoint it saves."""

    def __init__(self, config_yaml: str, choices: dict[str, Any] | None, run_dir: Path) -> None:
        self.record = {"config": config_yaml, "choices": choices, "run_dir": str(Path(run_dir).resolve())}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Stores the run's record in the checkpoint under ``RUN_CONFIG_KEY``."""
        checkpoint[RUN_CONFIG_KEY] = self.record


def schema_config(node: Any) -> DictConfig:
    """``node`` (YAML text, a container or a config) validated against the training schema."""
    loaded = OmegaConf.create(node) if isinstance(node, str) else node
    config = OmegaConf.merge(OmegaConf.structured(TrainConfig), loaded)
    OmegaConf.set_struct(config, True)
    return config  # type: ignore[return-value]


def stored_run(ckpt_path: str | Path) -> StoredRun | None:
    """The run a checkpoint came from: its own record, else its run's ``.hydra/`` files (``<run>/checkpoints/x.ckpt``,
    also for a checkpoint directory), else None."""
    path = Path(ckpt_path)
    if path.is_file():  # a directory (DeepSpeed's) is read through its run's .hydra/
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(RUN_CONFIG_KEY)
        if record is not None:
            return StoredRun(schema_config(record["config"]), record["choices"], Path(record["run_dir"]), str(path))
    hydra_dir = path.resolve().parent.parent / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        return None
    choices = None
    if (hydra_dir / "hydra.yaml").is_file():
        hydra_cfg = OmegaConf.load(hydra_dir / "hydra.yaml")
        choices = OmegaConf.to_container(hydra_cfg.hydra.runtime.choices)  # type: ignore[assignment]
    return StoredRun(schema_config(OmegaConf.load(hydra_dir / "config.yaml")), choices, hydra_dir.parent,
                     str(hydra_dir / "config.yaml"))


def resumable(key: str) -> bool:
    """Whether a resumed run may change ``key`` (a dotted path that is, or lies under, one of ``RESUMABLE``)."""
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE)


def leaf_differences(before: Any, after: Any, path: str = "") -> list[str]:
    """Dotted paths whose values differ between two plain containers."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [diff for key in sorted(set(before) | set(after), key=str)
                for diff in leaf_differences(before.get(key), after.get(key), f"{path}{key}.")]
    return [] if before == after else [path.rstrip(".")]


def refused_changes(parent: DictConfig, child: DictConfig) -> list[str]:
    """What ``child`` changes of ``parent`` outside ``RESUMABLE``, as ``key: old -> new``."""
    old = OmegaConf.to_container(parent, resolve=False)
    new = OmegaConf.to_container(child, resolve=False)
    return [f"{key}: {OmegaConf.select(parent, key, default=None)!r} -> {OmegaConf.select(child, key, default=None)!r}"
            for key in leaf_differences(old, new) if not resumable(key)]


def refusal(changes: Sequence[str], source: str) -> ValueError:
    """The error naming the ``changes`` a resumed run of ``source`` may not make, and what it may change."""
    return ValueError(f"a resumed run continues the run it came from ({source}); these overrides would change its "
                      f"model, data, LoRA, loss or optimizer: {'; '.join(changes)}. A resumed run may change only "
                      f"{', '.join(RESUMABLE)}; start a new run (without ckpt_path) for the others.")


def resumed_config(cfg: DictConfig, overrides: Sequence[str], choices: dict[str, Any]) -> DictConfig:
    """The config of ``ckpt_path=...`` on the command line: the checkpoint's run config with ``overrides`` (the
    command line's, as Hydra lists them) on top, ``cfg`` being their composition from the defaults and ``choices``
    its config-group choices. Anything else an override changes is refused, naming the keys."""
    stored = stored_run(cfg.ckpt_path)
    if stored is None:
        raise ValueError(f"ckpt_path={cfg.ckpt_path}: the checkpoint holds no run config (it predates miadpo's "
                         f"resume) and no .hydra/config.yaml sits in its run directory; repeat the run's overrides "
                         f"and resume from a copy of the run directory with its .hydra/")
    resumed = stored.config.copy()
    refused = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete():
            refused.append(f"~{key}")
        elif key in choices:  # a config group: the run's own choice changes nothing; another replaces its package
            before = (stored.choices or {}).get(key)
            if before == choices[key]:
                continue
            package = OmegaConf.select(cfg, key.replace("/", "."), default=None)
            if package is None:  # a group that sets the whole config (experiment=...)
                refused.append(f"{key}={choices[key]} (the run's: {before or 'unknown'})")
            else:
                OmegaConf.update(resumed, key.replace("/", "."), package, merge=False)
        else:
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key, default=None), merge=False)
    current = OmegaConf.to_container(cfg, resolve=False)
    resumed.run_dir = current["run_dir"]  # type: ignore[index]  # the new run's directory
    resumed.ckpt_path = cfg.ckpt_path
    refused += refused_changes(stored.config, resumed)
    if refused:
        raise refusal(refused, stored.source)
    return resumed


def check_resume(cfg: DictConfig) -> StoredRun | None:
    """A run resuming ``ckpt_path`` must be the run it came from (up to ``RESUMABLE``) and write elsewhere; returns
    that run (None for a checkpoint that records none, which cannot be checked)."""
    if not cfg.ckpt_path:
        return None
    stored = stored_run(cfg.ckpt_path)
    if stored is None:
        return None
    refused = refused_changes(stored.config, cfg)
    if refused:
        raise refusal(refused, stored.source)
    if stored.run_dir is not None and Path(cfg.run_dir).resolve() == stored.run_dir.resolve():
        raise ValueError(f"ckpt_path={cfg.ckpt_path}: the resumed run writes to a new run directory, not the one it "
                         f"came from ({stored.run_dir}); leave run_dir / hydra.run.dir to their default")
    return stored


def record_parent(run_dir: Path, ckpt_path: str, parent: StoredRun | None) -> None:
    """``<run_dir>/resumed_from.json``: the checkpoint and run directory the run continued."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resumed_from.json").write_text(json.dumps({
        "checkpoint": str(Path(ckpt_path).resolve()),
        "parent_run_dir": str(parent.run_dir) if parent is not None and parent.run_dir is not None else None,
        "config_from": parent.source if parent is not None else None,
    }, indent=1) + "\n")
