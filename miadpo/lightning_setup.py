"""Lightning objects built from config, shared by the entry points (train, sft, select)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from omegaconf import DictConfig, OmegaConf

from miadpo.config import LoggerName, StrategyConfig, StrategyName

# wandb's folders outside the run by default (~/.local/share/wandb, ~/.cache/wandb): the data folder holds the
# artifact staging area, where an offline run keeps the files of its logged tables and images until `wandb sync`;
# the cache folder, the artifact cache and wandb-core's logs. The config folder (user settings) is left alone.
WANDB_RUN_FOLDERS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process, for the stages that run outside a Trainer's hooks (inside them the
    Trainer's ``global_rank`` is the same number). The rank is Lightning's (``RANK``, ``LOCAL_RANK`` or
    ``SLURM_PROCID`` of processes started together, the strategy's once it launched), the world ``WORLD_SIZE``
    (torchrun and Lightning's launcher set it); (0, 1) alone."""
    return int(rank_zero_only.rank or 0), int(os.environ.get("WORLD_SIZE", 1))


def device_count(devices: Any, accelerator: Any = "auto") -> int:
    """How many devices ``trainer.devices`` asks for: a list's length, a count, ``"0,1"``-style ids, or, for
    ``auto`` / ``-1``, every visible GPU (one on CPU)."""
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return torch.cuda.device_count() if str(accelerator) != "cpu" and torch.cuda.is_available() else 1
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    return int(text)


def is_rank_zero() -> bool:
    """Whether this process does the once-per-job work (the first rank of ``process_rank``)."""
    return process_rank()[0] == 0


@contextmanager
def wandb_files_in(run_dir: Path) -> Iterator[None]:
    """Inside the block, every file wandb writes goes under ``<run_dir>/wandb/`` (the run's own folder, and
    ``data/``, ``cache/`` beside it); the environment is restored after."""
    saved = {name: os.environ.get(name) for name in WANDB_RUN_FOLDERS}
    os.environ.update({name: str((run_dir / "wandb" / folder).resolve()) for name, folder in WANDB_RUN_FOLDERS.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    """The run's logger; create it (and log to it, and finish it) inside ``wandb_files_in(run_dir)`` so that W&B
    keeps every file under the run directory."""
    if LoggerName(cfg.logger.name) is LoggerName.csv:
        return CSVLogger(save_dir=str(run_dir), name="csv")
    mode = {"dryrun": "offline"}.get(cfg.logger.mode, cfg.logger.mode)  # wandb's own older name, set after init
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


def deepspeed_config(cfg: StrategyConfig, micro_batch: int, accumulate: int = 1, precision: str = "32-true",
                     gradient_clipping: float | None = 1.0) -> dict[str, Any]:
    """The DeepSpeed configuration of ``strategy=deepspeed_zero*`` (the Lightning strategy and raw
    ``deepspeed.initialize`` use the same dictionary)."""
    zero: dict[str, Any] = {"stage": cfg.stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_parameters and cfg.stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulate,
                              "zero_optimization": zero, "bf16": {"enabled": precision.startswith("bf16")},
                              "fp16": {"enabled": precision.startswith("16")}}
    if gradient_clipping:
        config["gradient_clipping"] = gradient_clipping
    return config


def check_strategy(cfg: StrategyConfig) -> None:
    """What :func:`build_strategy` needs of this machine (checked before any stage of a job runs)."""
    if StrategyName(cfg.name) is StrategyName.deepspeed:
        if not torch.cuda.is_available():
            raise ValueError(f"strategy=deepspeed_zero{cfg.stage} needs CUDA GPUs (Lightning's DeepSpeed strategy runs "
                             "on GPUs only); on this machine use strategy=ddp or strategy=fsdp")
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("strategy=deepspeed_* needs the deepspeed package: pip install deepspeed")


def build_strategy(cfg: StrategyConfig, world_size: int = 1, micro_batch: int = 1, accumulate: int = 1,
                   precision: str = "32-true") -> Strategy | str:
    """``strategy.*`` → a Lightning strategy (``world_size``: processes in all, for the FSDP mesh; the rest for
    DeepSpeed's configuration)."""
    name = StrategyName(cfg.name)
    if name is StrategyName.ddp:
        return DDPStrategy(find_unused_parameters=cfg.find_unused_parameters)
    if name is StrategyName.cpu:
        return SingleDeviceStrategy(device=torch.device("cpu"))
    if name is StrategyName.fsdp:
        # PyTorch FSDP2 (fully_shard, applied by DPOModule.configure_model), which also runs on CPU processes
        # (Lightning's FSDPStrategy and FSDP1 need a GPU). Checkpoints hold the full (gathered) state.
        return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    if name is StrategyName.deepspeed:
        check_strategy(cfg)
        return DeepSpeedStrategy(config=deepspeed_config(cfg, micro_batch, accumulate, precision))
    return name.value


def check_trainer_args(trainer_cfg: DictConfig) -> dict[str, Any]:
    """``trainer.*`` as keyword arguments of lightning.Trainer; an unknown key is named."""
    kwargs: dict[str, Any] = OmegaConf.to_container(trainer_cfg, resolve=True)  # type: ignore[assignment]
    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "callbacks", "logger", "strategy"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"trainer.{unknown[0]} is not a lightning.Trainer argument (unknown: {unknown})")
    return kwargs


def check_checkpoint(path: str | Path, setting: str = "ckpt_path") -> None:
    """``path`` is a Lightning checkpoint that loads as Lightning will load it (``torch.load`` with its default,
    safe ``weights_only``), memory-mapped so that only its metadata is read; a directory (a DeepSpeed or
    distributed checkpoint) is left to its strategy. Anything else is named as not a readable checkpoint (never with
    torch's advice to load it unsafely, which does not mend a damaged file). Lightning's special values ("last",
    "best", "hpc", "registry[:...]") and remote URLs are left to Lightning."""
    text = str(path)
    if text in ("last", "best", "hpc") or text.lower().split(":")[0] == "registry" or "://" in text:
        return
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{setting}={path}: no such file")
    if path.is_dir():
        return
    unreadable = f"{setting}={path} is not a readable Lightning checkpoint"
    if not os.access(path, os.R_OK):
        raise ValueError(f"{unreadable} (no permission to read it)")
    if path.stat().st_size == 0:
        raise ValueError(f"{unreadable} (the file is empty)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{unreadable} (not a PyTorch zip archive: truncated, corrupt or another kind of file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True)
    except Exception as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = (f"it holds a Python object that a safe load refuses: {refused.group(1)}" if refused else
                  f"truncated or corrupt: its contents do not load ({type(error).__name__})")
        raise ValueError(f"{unreadable} ({reason})") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step"} <= set(checkpoint):
        raise ValueError(f"{unreadable} (a PyTorch file without a Lightning checkpoint's state_dict and global_step)")
