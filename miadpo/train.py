"""DPO training entry point: ``python -m miadpo.train [overrides]`` (Hydra, config root ``conf/``).

Thin wiring: config → adapter → DPOModule + PairDataModule → lightning.Trainer.fit → exported adapter.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from miadpo.batch import PairCollator
from miadpo.callbacks import BeforeAfterEval, ExportModel, LogLastStep
from miadpo.config import LoggerName, config_dir, register_configs
from miadpo.data_report import log_data_report, write_data_report
from miadpo.datamodule import PairDataModule, ResumeDataOrder
from miadpo.evaluate import eval_items, evaluate
from miadpo.lightning_setup import (
    build_logger,
    build_strategy,
    check_checkpoint,
    check_strategy,
    check_trainer_args,
    wandb_files_in,
)
from miadpo.losses import check_dpo
from miadpo.models import ModelAdapter, build_adapter
from miadpo.module import DPOModule, build_pair_forward, check_optim
from miadpo.pair_forward import PairForward
from miadpo.reference_cache import ReferenceCache, fill_reference_cache, model_key
from miadpo.rounds import run_rounds
from miadpo.select.stage import run_selection
from miadpo.toyworld.pipeline import ensure_toy_base, ensure_toy_world
from miadpo.toyworld.scenes import scene_index

log = logging.getLogger(__name__)
register_configs()
CONFIG_DIR = config_dir()


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    exported: Path | None
    wandb_run: Path | None
    metrics: dict[str, float]
    global_step: int


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], logger: Logger) -> L.Trainer:
    kwargs = check_trainer_args(cfg.trainer)
    kwargs.setdefault("default_root_dir", str(run_dir))
    if cfg.strategy.name == "cpu":
        kwargs["accelerator"] = "cpu"
    devices = kwargs.get("devices", 1)
    world_size = (len(devices) if isinstance(devices, list) else int(devices)) * int(kwargs.get("num_nodes", 1))
    strategy = build_strategy(cfg.strategy, world_size, micro_batch=cfg.data.batch_size,
                              accumulate=int(kwargs.get("accumulate_grad_batches", 1)),
                              precision=str(kwargs.get("precision", "32-true")))
    if cfg.strategy.name == "deepspeed":
        kwargs.pop("gradient_clip_val", None)  # DeepSpeed clips by its own config (gradient_clipping)
    return L.Trainer(**kwargs, callbacks=callbacks, logger=logger, strategy=strategy)


def is_single_process(cfg: DictConfig) -> bool:
    devices = cfg.trainer.get("devices", 1)
    one_device = devices in (1, "1") or (isinstance(devices, Sequence) and len(devices) == 1)
    return one_device and cfg.trainer.get("num_nodes", 1) == 1


def select_before_training(cfg: DictConfig, adapter: ModelAdapter) -> Path:
    """No pairs yet for a source recipe: augment and select in this process (single-process runs only)."""
    if not is_single_process(cfg):
        raise ValueError(
            f"data={cfg.data.name} has no pairs yet and this training run is multi-process; run "
            f"`python -m miadpo.select model={cfg.model.name} data={cfg.data.name}` first, then pass "
            "data.pairs=<the printed pairs.jsonl>"
        )
    pairs = run_selection(adapter, cfg.data, cfg.selection, cfg.seed,
                          trainer_kwargs={"accelerator": cfg.trainer.get("accelerator", "auto"), "devices": 1,
                                          "enable_progress_bar": cfg.trainer.get("enable_progress_bar", True)})
    assert pairs is not None
    if not pairs.read_text().strip():
        raise ValueError(f"selection kept no pairs; see {pairs.parent / 'report.txt'} for why each candidate "
                         "was dropped, and loosen selection.* accordingly")
    log.info("selection wrote %s", pairs)
    return pairs


def cache_reference_logps(cfg: DictConfig, adapter: ModelAdapter, datamodule: PairDataModule,
                          forward: PairForward) -> None:
    """Reference log-probs of every train/val pair, computed once (only the pairs not cached yet).

    The reference is the policy's starting weights, or ``dpo.reference_path`` when set (built for this pass only).
    """
    datamodule.prepare_data()
    datamodule.setup("fit")
    reference = adapter
    if cfg.dpo.reference_path is not None:
        reference = build_adapter(OmegaConf.merge(cfg.model, {"path": cfg.dpo.reference_path}))  # type: ignore[arg-type]
    root = Path(cfg.dpo.fast.reference_cache_dir or Path(cfg.data.out_dir) / "reference_logps")
    cache = ReferenceCache(root / model_key(reference, cfg.data), rank=int(os.environ.get("RANK", 0)))
    datasets = [datamodule.train_set, datamodule.val_set]
    for dataset in datasets:
        dataset.attach_reference(cache)
    fill_reference_cache(cache, datasets, reference.model, forward, PairCollator(adapter, forward.layout),
                         cfg.data.batch_size)


def report_data(cfg: DictConfig, datamodule: PairDataModule, run_dir: Path, logger: Logger) -> None:
    """Pair statistics, ratio histogram and sample pairs with attention heat maps (local files, and W&B)."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.train_set is not None and datamodule.val_set is not None
    records = datamodule.train_set.records + datamodule.val_set.records
    report = write_data_report(records, datamodule.roots, datamodule.pairs_path(), run_dir, cfg.data.report_samples)
    if isinstance(logger, WandbLogger) and cfg.logger.mode != "disabled":
        log_data_report(logger.experiment, report)


def build_before_after(cfg: DictConfig, adapter: ModelAdapter, run_dir: Path) -> BeforeAfterEval | None:
    """The before/after evaluation of ``eval.*``, or None when no evaluation set is configured."""
    if not cfg.eval.files and not cfg.eval.tsv:
        return None
    items, _ = eval_items(cfg.eval)  # records with an unusable image: skipped and counted, or stop (eval.*)
    scenes = scene_index(cfg.eval.toy_source) if cfg.eval.toy_source else None
    return BeforeAfterEval(adapter, items, run_dir, cfg.eval.batch_size, cfg.eval.max_new_tokens, scenes, evaluate)


def check_job(cfg: DictConfig) -> None:
    """Everything of the job that can be wrong without running it, checked before the model is built or any stage
    (base saved, selection, reference pass) runs: the Trainer arguments, the strategy on this machine, the loss and
    optimizer settings, and ``ckpt_path`` (a readable Lightning checkpoint). A bad setting is named."""
    if cfg.dpo.reference_path is not None and not cfg.dpo.fast.reference_cache:
        raise ValueError("dpo.reference_path needs dpo.fast.reference_cache=true (the other reference is held "
                         "in memory: the policy with LoRA disabled, or a copy of its starting weights)")
    check_trainer_args(cfg.trainer)
    check_strategy(cfg.strategy)
    check_dpo(cfg.dpo)  # type: ignore[arg-type]
    check_optim(cfg.optim)  # type: ignore[arg-type]
    if cfg.ckpt_path is not None:
        check_checkpoint(cfg.ckpt_path)


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    """Run one DPO training job described by a composed config (``extra_callbacks``: added to the Trainer's)."""
    check_job(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    toy_data = cfg.data.name == "toy" and cfg.data.source and rank_zero_only.rank == 0
    if toy_data and cfg.model.name == "toy_llava" and cfg.model.path:
        ensure_toy_base(cfg.model.path, Path(cfg.data.source).parent)  # the shipped toy base, on first use
    adapter = build_adapter(cfg.model)
    if toy_data:
        ensure_toy_world(Path(cfg.data.source).parent)  # the toy splits, generated on first use
    if cfg.model.path is None:
        # A model built in code: save its weights with the run so the adapter is usable on its own.
        base_path = str((run_dir / "base_model").resolve())
        if rank_zero_only.rank == 0:
            adapter.save_base(base_path)
    else:  # recorded in the exported adapter: a local directory as an absolute path, resolvable from anywhere
        base_path = str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).is_dir() else cfg.model.path
    if cfg.data.pairs is None and cfg.data.source:
        cfg.data.pairs = str(select_before_training(cfg, adapter))
    forward = build_pair_forward(adapter, cfg.dpo.fast)
    datamodule = PairDataModule(cfg.data, adapter, seed=cfg.seed, layout=forward.layout)
    if cfg.dpo.fast.reference_cache:
        cache_reference_logps(cfg, adapter, datamodule, forward)  # before LoRA: the model is the reference
    # Training randomness (LoRA initialisation, dropout) starts from the seed whether the data stages above ran
    # or were read from their caches (a data loader draws from the global generator even when it is empty).
    L.seed_everything(cfg.seed, workers=True)
    adapter.prepare_for_training()
    module = DPOModule(adapter, cfg.dpo, cfg.optim, pair_forward=forward, cached_reference=cfg.dpo.fast.reference_cache)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        # epoch0-step3.ckpt: no "=" (Lightning's default epoch=0-step=3 is not a valid Hydra override value, so
        # `ckpt_path=<it>` could not be passed on the command line).
        filename="epoch{epoch}-step{step}",
        auto_insert_metric_name=False,
        save_last=cfg.checkpoint.save_last,
        save_top_k=cfg.checkpoint.save_top_k,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        monitor=cfg.checkpoint.monitor,
        mode=cfg.checkpoint.mode,
    )
    export = ExportModel(adapter, run_dir, base_path)
    wandb_run = None
    with wandb_files_in(run_dir) if LoggerName(cfg.logger.name) is LoggerName.wandb else nullcontext():
        logger = build_logger(cfg, run_dir)
        if cfg.data.report_samples and rank_zero_only.rank == 0:
            report_data(cfg, datamodule, run_dir, logger)
        # LogLastStep first: its metrics reach the loggers before the other callbacks' end-of-training entries.
        callbacks: list[L.Callback] = [LogLastStep(), checkpoint, export, LearningRateMonitor("step"),
                                       ResumeDataOrder(), *extra_callbacks]
        before_after = build_before_after(cfg, adapter, run_dir)
        if before_after is not None:
            callbacks.append(before_after)
        trainer = build_trainer(cfg, run_dir, callbacks, logger)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and cfg.logger.mode != "disabled":
            wandb_run = Path(logger.experiment.dir).parent
            logger.experiment.finish()
    last = Path(checkpoint.last_model_path) if checkpoint.last_model_path else None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = TrainResult(run_dir, last, export.exported, wandb_run, metrics, trainer.global_step)
    if trainer.is_global_zero:
        # The final metrics (and the before/after evaluation) of this job, for sweep summaries.
        evaluation = {f"eval/{group}/{moment}": row["accuracy"] for moment, table in
                      (before_after.tables.items() if before_after is not None else []) for group, row in table.items()}
        (run_dir / "metrics.json").write_text(json.dumps({"global_step": trainer.global_step, **metrics,
                                                          **evaluation}, indent=1) + "\n")
        print(f"run directory:   {run_dir.resolve()}")
        print(f"checkpoint:      {last}")
        print(f"exported model:  {export.exported}")
        print(f"base weights:    {base_path}")
        if wandb_run is not None:
            print(f"W&B run:         {wandb_run}  (sync with `wandb sync {wandb_run}`)")
        elif isinstance(logger, CSVLogger):
            print(f"CSV metrics:     {Path(logger.log_dir) / 'metrics.csv'}")
        if before_after is not None and "after" in before_after.tables:
            print(f"evaluation before/after ({run_dir / 'eval_before_after.md'}):")
            print(before_after.markdown())
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    if cfg.rounds.count > 1:
        records = run_rounds(cfg, train)
        print(f"rounds: {len(records)} (policies: {', '.join(r['policy'] for r in records)})")
        print(f"evaluation per round ({Path(cfg.run_dir) / 'eval_rounds.md'}):")
        print((Path(cfg.run_dir) / "eval_rounds.md").read_text())
    else:
        train(cfg)


if __name__ == "__main__":
    main()
