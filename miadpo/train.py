"""DPO training entry point: ``python -m miadpo.train [overrides]`` (Hydra, config root ``conf/``).

Thin wiring of the stages in ``miadpo.pipeline``: check → model → base → pairs (the recipe's preparation step) →
reference pass → DPOModule + PairDataModule → Lightning fit (before/after evaluation, export) → summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.seed import isolate_rng
from omegaconf import DictConfig

from miadpo import pipeline
from miadpo.config import config_dir, read_only, register_configs
from miadpo.data.dataset import PairDataModule
from miadpo.dpo.module import DPOModule, build_pair_forward
from miadpo.dpo.reference import build_reference
from miadpo.lightning_setup import check_checkpoint
from miadpo.pipeline import TrainResult
from miadpo.resume import resumed_config
from miadpo.rounds import run_rounds

register_configs()
CONFIG_DIR = config_dir()


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    """Run one DPO training job described by a composed config (``extra_callbacks``: added to the Trainer's). The
    config is read-only from here on: each stage returns what it makes."""
    pipeline.check_job(cfg)
    run_config = pipeline.run_config(cfg)  # as composed, before any stage: what a resume restores
    cfg = read_only(pipeline.smoke_config(cfg))  # trainer.fast_dev_run: one batch of each stage
    L.seed_everything(cfg.seed, workers=True)  # the one seeding point
    # The stages before training draw random numbers only where they run rather than read their caches (a data
    # loader draws from the global generator even when it is empty): isolated from them, training randomness (LoRA
    # initialisation, dropout) starts from the seed either way.
    with isolate_rng():
        adapter = pipeline.prepare_model(cfg.model)
        base_path = pipeline.save_base(cfg, adapter)
        pairs = pipeline.prepare_data(cfg, adapter)
        forward = build_pair_forward(adapter, cfg.dpo.fast)
        datamodule = PairDataModule(cfg.data, adapter, forward.collate, seed=cfg.seed,
                                    image_negatives=cfg.dpo.conditional_weight > 0, pairs=pairs)
        datamodule.setup("fit")
        cache = pipeline.reference_stage(cfg, adapter, datamodule, forward)
    adapter.prepare_for_training()
    # Every pair cached (a pre-pass, an earlier run or epoch): no reference is built or run.
    covers_all = cache is not None and pipeline.covers_all_pairs(cache, datamodule)
    module = DPOModule(adapter, cfg.dpo, cfg.optim, pair_forward=forward,
                       reference=build_reference(adapter.model, cache, covers_all,
                                                 only_cached=cfg.dpo.reference_path is not None))
    return pipeline.fit(cfg, adapter, module, datamodule, base_path, [run_config, *extra_callbacks])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    """``python -m miadpo.train``: one job, or ``rounds.count`` on-policy rounds (a resume first restores the
    checkpoint's run config)."""
    if cfg.ckpt_path:  # the checkpoint's run config, with this command line's overrides on top
        check_checkpoint(cfg.ckpt_path)
        hydra_cfg = HydraConfig.get()
        cfg = resumed_config(cfg, hydra_cfg.overrides.task, dict(hydra_cfg.runtime.choices))
    if cfg.rounds.count > 1:
        records = run_rounds(cfg, train)
        print(f"rounds: {len(records)} (policies: {', '.join(r['policy'] for r in records)})")
        print(f"evaluation per round ({Path(cfg.run_dir) / 'eval_rounds.md'}):")
        print((Path(cfg.run_dir) / "eval_rounds.md").read_text())
    else:
        train(cfg)


if __name__ == "__main__":
    main()
