"""Lightning objects built from config, shared by the entry points (train, sft, select)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from omegaconf import DictConfig, OmegaConf

from miadpo.config import LoggerName, StrategyConfig


def build_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    if LoggerName(cfg.logger.name) is LoggerName.csv:
        return CSVLogger(save_dir=str(run_dir), name="csv")
    mode = cfg.logger.mode
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode (or WANDB_MODE) must be online, offline or disabled, not {mode!r}")
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        save_dir=str(run_dir),
        offline=mode == "offline",
        tags=list(cfg.logger.tags),
        group=cfg.logger.group,
        name=cfg.logger.run_name,
        **({"mode": "disabled"} if mode == "disabled" else {}),
    )


def build_strategy(cfg: StrategyConfig) -> Strategy | str:
    if cfg.name == "ddp":
        return DDPStrategy(find_unused_parameters=cfg.find_unused_parameters)
    return cfg.name


def check_trainer_args(trainer_cfg: DictConfig) -> dict[str, Any]:
    """``trainer.*`` as keyword arguments of lightning.Trainer; an unknown key is named."""
    kwargs: dict[str, Any] = OmegaConf.to_container(trainer_cfg, resolve=True)  # type: ignore[assignment]
    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "callbacks", "logger", "strategy"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"trainer.{unknown[0]} is not a lightning.Trainer argument (unknown: {unknown})")
    return kwargs
