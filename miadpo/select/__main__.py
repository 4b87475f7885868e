"""``python -m miadpo.select model=... data=... selection=...``: candidates and pairs for a dataset recipe."""

from __future__ import annotations

import hydra
import lightning as L
from omegaconf import DictConfig

from miadpo.config import SelectJobConfig, check_keys, check_recipe, config_dir, read_only, register_configs
from miadpo.lightning_setup import build_strategy, check_trainer_args
from miadpo.pipeline import check_inputs, prepare_model, prepare_sources
from miadpo.select.stage import run_selection

register_configs()
CONFIG_DIR = config_dir()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="select")
def main(cfg: DictConfig) -> None:
    """``python -m miadpo.select``: augment and select with the model of ``model.*``; prints where the pairs are."""
    check_keys(cfg, SelectJobConfig)
    cfg = read_only(cfg)
    check_recipe(cfg.data, cfg.model)  # type: ignore[arg-type]
    check_inputs(cfg.data, cfg.model)
    trainer_kwargs = check_trainer_args(cfg.trainer)
    prepare_sources(cfg.data)
    L.seed_everything(cfg.seed)
    adapter = prepare_model(cfg.model)
    adapter.model.eval()
    pairs = run_selection(adapter, cfg.data, cfg.selection, cfg.seed, trainer_kwargs=trainer_kwargs,
                          strategy=build_strategy(cfg.strategy))
    if pairs is not None:
        print((pairs.parent / "report.txt").read_text())
        print(f"pairs: {pairs.resolve()}")


if __name__ == "__main__":
    main()
