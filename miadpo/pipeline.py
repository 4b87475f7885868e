"""The stages of a DPO job, each a function of the composed (read-only) config that returns what it makes, in the
order ``miadpo.train`` runs them:

1. ``check_job``        everything that can be wrong without running anything
2. ``prepare_model``    the model's preparation step (``model.prepare``), then the adapter
3. ``save_base``        the base weights the exported adapter refers to (their path)
4. ``prepare_data``     the recipe's preparation step (``data.prepare``): the pair file to train on (given,
                        converted, mixed, synthetic, or augmented and selected)
5. ``reference_stage``  the reference log-probs on disk (``reference_cache``); ``reference_pass`` fills it before
                        training where ``uses_reference_prepass`` (else the first epoch's steps fill it)
6. ``report_data``      pair statistics and samples (local files and W&B)
7. ``fit``              Lightning training, with the before/after evaluation and the export as callbacks, then
   ``summarise``        metrics.json and the printed summary; ``fit`` returns the ``TrainResult``

No stage branches on a config *name*: a recipe names its preparation steps in config. No stage writes into the
config: what one stage makes reaches the next as an argument.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from miadpo.config import (
    DataPreparation,
    LoggerName,
    ModelPreparation,
    StrategyName,
    TrainConfig,
    check_keys,
    check_recipe,
)
from miadpo.data.dataset import PairDataModule, ResumeDataOrder
from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport, ImageRoots
from miadpo.data.preferences import convert_preferences, mix_pair_sets
from miadpo.data.report import log_data_report, write_data_report
from miadpo.dpo.batch import PairBatch
from miadpo.dpo.callbacks import ExportModel, LogLastStep
from miadpo.dpo.forward import PairForward
from miadpo.dpo.module import DPOModule
from miadpo.dpo.reference_cache import ReferenceCache, dataset_needs, fill_reference_cache, model_key
from miadpo.eval.before_after import BeforeAfterEval
from miadpo.eval.scoring import prompt_limit
from miadpo.eval.sets import check_eval_set, eval_items, has_eval_set
from miadpo.lightning_setup import (
    build_logger,
    build_strategy,
    check_checkpoint,
    check_strategy,
    check_trainer_args,
    device_count,
    is_rank_zero,
    process_rank,
    wandb_files_in,
)
from miadpo.models import ModelAdapter, build_adapter, check_model_config
from miadpo.models.loading import check_weights_path
from miadpo.resume import StoreRunConfig, check_resume, record_parent, stored_run
from miadpo.select.stage import run_selection
from miadpo.toyworld.errors import ToyErrors
from miadpo.toyworld.pipeline import ensure_toy_base, ensure_toy_world
from miadpo.toyworld.synthetic import ensure_synthetic_pairs

log = logging.getLogger(__name__)
THROUGHPUT_WINDOW = 4  # batches averaged by the throughput meter (short: toy runs are a few dozen steps)


@dataclass
class TrainResult:
    """What a training job made: its directory, checkpoint, exported model, W&B run, final metrics, step count and
    the pair file it trained on."""

    run_dir: Path
    checkpoint: Path | None
    exported: Path | None
    wandb_run: Path | None
    metrics: dict[str, float]
    global_step: int
    pairs: Path


def check_job(cfg: DictConfig) -> None:
    """Everything of the job that can be wrong without running it, checked before the model is built or any stage
    (base saved, selection, reference pass) runs: the Trainer arguments, the strategy on this machine, the loss and
    optimizer settings, the benchmark directories of the evaluation set and ``ckpt_path`` (a readable Lightning
    checkpoint). A bad setting is named: a key the schema lacks, the toy recipe asked to run on other data or
    another model, a missing pair file."""
    check_keys(cfg, TrainConfig)
    check_recipe(cfg.data, cfg.model)  # type: ignore[arg-type]
    check_pairs(cfg.data)
    check_model_config(cfg.model)  # type: ignore[arg-type]
    check_inputs(cfg.data, cfg.model)
    if cfg.dpo.reference_path is not None and not (cfg.dpo.fast.reference_cache and uses_reference_prepass(cfg)):
        raise ValueError("dpo.reference_path needs dpo.fast.reference_cache=true and the pre-pass "
                         "(dpo.fast.reference_prepass not false): the reference held in memory during training is "
                         "the policy with LoRA disabled, or a copy of its starting weights")
    check_trainer_args(cfg.trainer)
    check_strategy(cfg.strategy)
    check_eval_set(cfg.eval)
    if cfg.ckpt_path is not None:
        check_checkpoint(cfg.ckpt_path)
        check_resume(cfg)  # the run it came from, up to what a resume may change; another run directory


def smoke_config(cfg: DictConfig) -> DictConfig:
    """With ``trainer.fast_dev_run``, the job as one batch of each stage, in a copy of ``cfg``: augmentation and
    selection of one generation batch of records into ``<run_dir>/fast_dev_run/`` (no cache of a real run is read
    or written), no reference cache and no data report, Lightning's one training (and validation) batch, and one
    evaluation batch before and after. Without it, ``cfg`` itself. (With ``dpo.reference_path`` the reference cache
    stays on, under ``<run_dir>/fast_dev_run``: only it holds that reference.)"""
    if not cfg.trainer.get("fast_dev_run"):
        return cfg
    return OmegaConf.merge(cfg, {  # type: ignore[return-value]
        "data": {"out_dir": str(Path(cfg.run_dir) / "fast_dev_run"), "report_samples": 0,
                 "augment": {"max_records": int(cfg.selection.generation.batch_size)}},
        "dpo": {"fast": {"reference_cache": cfg.dpo.reference_path is not None,
                         "reference_cache_dir": None}}})


def run_config(cfg: DictConfig) -> StoreRunConfig:
    """The callback that stores the run's config (as composed, before any stage ran) in its checkpoints."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else None
    return StoreRunConfig(OmegaConf.to_yaml(cfg), choices, Path(cfg.run_dir))


def check_pairs(data: DictConfig) -> None:
    """``data.pairs``, where the recipe needs it (``data.prepare=pairs``) or names it, is a file (or ``data.mix``
    names the sets instead)."""
    if data.mix:
        if not OmegaConf.is_missing(data, "pairs") and data.pairs:
            raise ValueError("data.pairs and data.mix are both set: name one pair file, or the sets of a mix")
        return
    if OmegaConf.is_missing(data, "pairs") or (DataPreparation(data.prepare) is DataPreparation.pairs
                                                and not data.pairs):
        raise ValueError(f"data={data.name} trains on a pair file: set data.pairs=<pairs.jsonl> (and "
                         "data.image_root=<where its relative image paths resolve>)")
    if data.pairs and not (Path(data.pairs).is_file() or (data.columns is not None and Path(data.pairs).is_dir())):
        raise FileNotFoundError(f"data.pairs={data.pairs}: no such file" + (" or folder" if data.columns else ""))


def check_inputs(data: DictConfig, model: DictConfig | None = None) -> None:
    """What a job reads, named before any model loads: ``data.source`` and ``data.image_root`` of a recipe that
    augments and selects (``data.prepare=select`` without ``data.pairs``), and ``model.path``, the weights
    directory (not for a model built in code or prepared by its recipe, such as the toy base)."""
    if DataPreparation(data.prepare) is DataPreparation.select and not data.pairs:
        if not data.source:
            raise ValueError(f"data={data.name} augments and selects from data.source: set it to a LLaVA-format "
                             "JSON (or JSONL), or give data.pairs")
        if not Path(data.source).is_file():
            raise FileNotFoundError(f"data.source={data.source} (data={data.name}): no such file")
        if not Path(data.image_root).is_dir():
            raise FileNotFoundError(f"data.image_root={data.image_root} (data={data.name}, where the images of "
                                    f"{data.source} resolve): no such directory")
    if model is not None and model.path and ModelPreparation(model.prepare) is ModelPreparation.none:
        check_weights_path(model)  # type: ignore[arg-type]


def prepare_sources(data: DictConfig) -> None:
    """The recipe's source files where it makes them (``data.prepare=toy_world``: the toy splits beside
    ``data.source``, generated on first use, on rank 0)."""
    if DataPreparation(data.prepare) is DataPreparation.toy_world and is_rank_zero():
        if not data.source:
            raise ValueError("data.prepare=toy_world needs data.source (the toy pool split; the splits go beside it)")
        ensure_toy_world(Path(data.source).parent)


def prepare_eval_set(eval_cfg: DictConfig) -> None:
    """The toy world's evaluation split, generated on first use where ``eval.toy_source`` names one that is not
    there yet (``eval=toy`` in a fresh working directory), on rank 0."""
    if eval_cfg.toy_source and not Path(eval_cfg.toy_source).is_file() and is_rank_zero():
        ensure_toy_world(Path(eval_cfg.toy_source).parent)


TOY_BASE_DIR_NAME = "base"  # the toy base's directory (data/toyworld/base), the one place it is copied to


def prepare_model(model: DictConfig) -> ModelAdapter:
    """Run ``model.prepare`` (on rank 0), then build the adapter of ``model``. The shipped toy base is copied only
    into a missing directory named ``base``, so a mistyped path to a trained toy model stops instead of being
    filled with the base."""
    if ModelPreparation(model.prepare) is ModelPreparation.toy_base and model.path and is_rank_zero():
        if not Path(model.path).is_dir() and Path(model.path).name != TOY_BASE_DIR_NAME:
            raise FileNotFoundError(f"model.path={model.path}: no such directory (model={model.name} copies the "
                                    f"shipped toy base only into a missing directory named "
                                    f"'{TOY_BASE_DIR_NAME}', as data/toyworld/base; a trained toy model is "
                                    "<run>/model)")
        ensure_toy_base(model.path, Path(model.path).parent)  # the shipped toy base, on first use
    return build_adapter(model)  # type: ignore[arg-type]


def save_base(cfg: DictConfig, adapter: ModelAdapter) -> str:
    """Where the exported adapter's base weights are: a model built in code is saved with the run (so the adapter
    is usable on its own); a local directory is recorded as an absolute path, resolvable from anywhere."""
    if cfg.model.path is None:
        base_path = str((Path(cfg.run_dir) / "base_model").resolve())
        if is_rank_zero():
            adapter.save_base(base_path)
        return base_path
    return str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).is_dir() else cfg.model.path


def is_single_process(cfg: DictConfig) -> bool:
    """Whether the Trainer runs one process (one device, one node)."""
    devices = device_count(cfg.trainer.get("devices", 1), cfg.trainer.get("accelerator", "auto"))
    return devices == 1 and cfg.trainer.get("num_nodes", 1) == 1


def prepare_data(cfg: DictConfig, adapter: ModelAdapter) -> Path:
    """Run the recipe's ``data.prepare`` step and return the pair file to train on: ``data.pairs`` itself, its
    conversion (``data.columns``), the mix of ``data.mix``, or the pairs the recipe makes when it is unset."""
    prepare_sources(cfg.data)
    if cfg.data.mix:  # several preference sets with their weights, as one pair file
        return mix_pair_sets(cfg.data.mix, cfg.data.out_dir, cfg.seed, cfg.data.on_bad_record,
                             cfg.data.max_bad_fraction)
    if cfg.data.pairs and cfg.data.columns is not None:  # a preference set of another layout, converted once
        report = BadRecordReport(cfg.data.on_bad_record, cfg.data.max_bad_fraction, stage="preferences")
        return convert_preferences(cfg.data.pairs, cfg.data.columns, cfg.data.out_dir, report)
    if cfg.data.pairs:
        return Path(cfg.data.pairs)
    if DataPreparation(cfg.data.prepare) is DataPreparation.synthetic:
        return ensure_synthetic_pairs(cfg.data.synthetic, ImageRoots.of(cfg.data))
    return select_pairs(cfg, adapter)


def select_pairs(cfg: DictConfig, adapter: ModelAdapter) -> Path:
    """Augment ``data.source`` and select pairs with the model, in this process (single-process runs only)."""
    if not cfg.data.source:
        raise ValueError(f"data={cfg.data.name}: data.prepare={cfg.data.prepare} needs data.source (a LLaVA-format "
                         "JSON to augment and select from), or point data.pairs at a pair JSONL")
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


def uses_reference_prepass(cfg: DictConfig) -> bool:
    """Whether the reference cache is filled before training (``dpo.fast.reference_prepass``; null: for full
    fine-tuning and for ``dpo.reference_path``) rather than in the first epoch's steps."""
    fast = cfg.dpo.fast
    if fast.reference_prepass is not None:
        return bool(fast.reference_prepass)
    return cfg.dpo.reference_path is not None or not cfg.model.lora.enabled


def reference_cache(cfg: DictConfig, reference: ModelAdapter, datamodule: PairDataModule) -> ReferenceCache:
    """The cache of ``reference``'s log-probs (``reference_adapter``; before LoRA is applied, the model key being
    the reference's), attached to the train and val pairs of ``datamodule`` (set up)."""
    if datamodule.train_set is None or datamodule.val_set is None:
        raise RuntimeError("reference_cache needs the datamodule set up (datamodule.setup('fit')) first")
    root = Path(cfg.dpo.fast.reference_cache_dir or Path(cfg.data.out_dir) / "reference_logps")
    cache = ReferenceCache(root / model_key(reference, cfg.data), rank=process_rank()[0])
    for dataset in (datamodule.train_set, datamodule.val_set):
        dataset.attach_reference(cache)
    return cache


def reference_adapter(cfg: DictConfig, adapter: ModelAdapter) -> ModelAdapter:
    """The reference: the policy's starting weights (``adapter``), or ``dpo.reference_path`` (for the cache key
    and the pre-pass only)."""
    if cfg.dpo.reference_path is None:
        return adapter
    return build_adapter(OmegaConf.merge(cfg.model, {"path": cfg.dpo.reference_path}))  # type: ignore[arg-type]


def reference_stage(cfg: DictConfig, adapter: ModelAdapter, datamodule: PairDataModule,
                    forward: PairForward) -> ReferenceCache | None:
    """The reference cache of the run (``dpo.fast.reference_cache``; None when off), attached to its pairs and
    filled before training where ``uses_reference_prepass``. Called before LoRA is applied: ``adapter`` is then the
    reference, unless ``dpo.reference_path`` names another model."""
    if not cfg.dpo.fast.reference_cache:
        return None
    reference = reference_adapter(cfg, adapter)
    cache = reference_cache(cfg, reference, datamodule)
    if uses_reference_prepass(cfg):
        reference_pass(cfg, reference, datamodule, forward, cache)
    return cache


def covers_all_pairs(cache: ReferenceCache, datamodule: PairDataModule) -> bool:
    """Whether ``cache`` holds every train and val pair (with its negative where the pair is trained with one)."""
    needs = [pair for dataset in (datamodule.train_set, datamodule.val_set) for pair in dataset_needs(dataset)]
    return cache.covers([key for key, _ in needs], [need for _, need in needs])


def reference_pass(cfg: DictConfig, reference: ModelAdapter, datamodule: PairDataModule, forward: PairForward,
                   cache: ReferenceCache) -> None:
    """Reference log-probs of every train/val pair not cached yet, before training (processes started together
    share the work: ``fill_reference_cache``; Lightning's own launcher starts its processes later, and they find
    the pre-pass done)."""
    rank, world = process_rank()
    fill_reference_cache(cache, [datamodule.train_set, datamodule.val_set], reference.model, forward,
                         cfg.data.batch_size, rank=rank, world=world)


def report_data(cfg: DictConfig, datamodule: PairDataModule, logger: Logger) -> None:
    """Pair statistics, ratio histogram and sample pairs with attention heat maps (local files, and W&B), of the
    pairs of ``datamodule`` (set up)."""
    assert datamodule.train_set is not None and datamodule.val_set is not None, "datamodule.setup('fit') first"
    records = datamodule.train_set.records + datamodule.val_set.records
    report = write_data_report(records, datamodule.roots, datamodule.pairs, Path(cfg.run_dir),
                               cfg.data.report_samples)
    if isinstance(logger, WandbLogger) and cfg.logger.mode != "disabled":
        log_data_report(logger.experiment, report)


def before_after_eval(cfg: DictConfig, adapter: ModelAdapter) -> BeforeAfterEval | None:
    """The before/after evaluation of ``eval.*``, or None when no evaluation set is configured."""
    if not has_eval_set(cfg.eval):
        return None
    prepare_eval_set(cfg.eval)
    items, report = eval_items(cfg.eval)  # records with an unusable image: skipped and counted, or stop (eval.*)
    if cfg.trainer.get("fast_dev_run"):  # one batch, spread over the set (every group, where it is large enough)
        items = items[:: max(1, len(items) // cfg.eval.batch_size)][: cfg.eval.batch_size]
    classify = ToyErrors.of_source(cfg.eval.toy_source) if cfg.eval.toy_source else None
    return BeforeAfterEval(adapter, items, Path(cfg.run_dir), cfg.eval.batch_size, cfg.eval.max_new_tokens, classify,
                           ImageOptions.of(cfg.eval), report,
                           prompt_limit(adapter, cfg.eval.max_length, cfg.eval.max_new_tokens))


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], logger: Logger) -> L.Trainer:
    """The Lightning Trainer of ``trainer.*`` with the strategy of ``strategy.*``, the callbacks and the logger."""
    kwargs = check_trainer_args(cfg.trainer)
    kwargs.setdefault("default_root_dir", str(cfg.run_dir))
    if StrategyName(cfg.strategy.name) is StrategyName.cpu:
        kwargs["accelerator"] = "cpu"
    devices = device_count(kwargs.get("devices", 1), kwargs.get("accelerator", "auto"))
    world_size = devices * int(kwargs.get("num_nodes", 1))
    strategy = build_strategy(cfg.strategy, world_size, micro_batch=cfg.data.batch_size,
                              accumulate=int(kwargs.get("accumulate_grad_batches", 1)),
                              precision=str(kwargs.get("precision", "32-true")))
    if StrategyName(cfg.strategy.name) is StrategyName.deepspeed:
        kwargs.pop("gradient_clip_val", None)  # DeepSpeed clips by its own config (gradient_clipping)
    return L.Trainer(**kwargs, callbacks=callbacks, logger=logger, strategy=strategy)


def pairs_in(batch: PairBatch) -> int:
    """The number of pairs in a batch (the throughput meter's batch size)."""
    return batch.num_pairs


def throughput_monitor() -> ThroughputMonitor:
    """Lightning's throughput meter, counting pairs: ``train/device/samples_per_sec`` is pairs per second over the last
    ``window_size`` training batches (with batches per second beside it), in the loggers."""
    return ThroughputMonitor(batch_size_fn=pairs_in, window_size=THROUGHPUT_WINDOW)


def checkpoint_callback(cfg: DictConfig) -> ModelCheckpoint:
    """Lightning's checkpointing as ``checkpoint.*`` sets it, into ``<run_dir>/checkpoints``."""
    return ModelCheckpoint(
        dirpath=Path(cfg.run_dir) / "checkpoints",
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


def hyperparameters(cfg: DictConfig, pairs: Path) -> dict:
    """The run's config as the loggers record it, with ``data.pairs`` the pair file it trained on (the one the
    recipe made where the config left it unset)."""
    values: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    values["data"]["pairs"] = str(pairs)
    return values


def fit(cfg: DictConfig, adapter: ModelAdapter, module: DPOModule, datamodule: PairDataModule, base_path: str,
        extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    """Train with Lightning (the data report first; the before/after evaluation and the export as callbacks), then
    summarise on rank 0."""
    run_dir = Path(cfg.run_dir)
    if cfg.ckpt_path is not None and is_rank_zero():
        record_parent(run_dir, cfg.ckpt_path, stored_run(cfg.ckpt_path))
    checkpoint = checkpoint_callback(cfg)
    export = ExportModel(adapter, run_dir, base_path)
    wandb_run = None
    with wandb_files_in(run_dir) if LoggerName(cfg.logger.name) is LoggerName.wandb else nullcontext():
        logger = build_logger(cfg, run_dir)
        if cfg.data.report_samples and is_rank_zero():
            report_data(cfg, datamodule, logger)
        # LogLastStep first: its metrics reach the loggers before the other callbacks' end-of-training entries.
        callbacks: list[L.Callback] = [LogLastStep(), checkpoint, export, LearningRateMonitor("step"),
                                       throughput_monitor(), ResumeDataOrder(), *extra_callbacks]
        before_after = before_after_eval(cfg, adapter)
        if before_after is not None:
            callbacks.append(before_after)
        trainer = build_trainer(cfg, callbacks, logger)
        logger.log_hyperparams(hyperparameters(cfg, datamodule.pairs))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and cfg.logger.mode != "disabled":
            wandb_run = Path(logger.experiment.dir).parent
            logger.experiment.finish()
    last = Path(checkpoint.last_model_path) if checkpoint.last_model_path else None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = TrainResult(run_dir, last, export.exported, wandb_run, metrics, trainer.global_step, datamodule.pairs)
    if trainer.is_global_zero:
        summarise(result, before_after, logger, base_path)
    return result


def summarise(result: TrainResult, before_after: BeforeAfterEval | None, logger: Logger, base_path: str) -> None:
    """metrics.json (the final metrics and the before/after evaluation, for sweep summaries) and the summary."""
    run_dir = result.run_dir
    evaluation = {f"eval/{group}/{moment}": row["accuracy"] for moment, table in
                  (before_after.tables.items() if before_after is not None else []) for group, row in table.items()}
    (run_dir / "metrics.json").write_text(json.dumps({"global_step": result.global_step, **result.metrics,
                                                      **evaluation}, indent=1) + "\n")
    print(f"run directory:   {run_dir.resolve()}")
    for label, path in (("checkpoint:     ", result.checkpoint), ("exported model: ", result.exported),
                        ("base weights:   ", base_path)):
        if path is not None and Path(path).exists():  # only paths that exist (no checkpoint without save_last)
            print(f"{label} {path}")
    if result.wandb_run is not None:
        print(f"W&B run:         {result.wandb_run}  (sync with `wandb sync {result.wandb_run}`)")
    elif isinstance(logger, CSVLogger):
        print(f"CSV metrics:     {Path(logger.log_dir) / 'metrics.csv'}")
    if before_after is not None and "after" in before_after.tables:
        print(f"evaluation before/after ({run_dir / 'eval_before_after.md'}):")
        print(before_after.markdown())
