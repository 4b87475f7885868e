"""``python -m miadpo.augment data=sequence|grid|pip|mix data.source=... data.image_root=... seed=...``"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from miadpo.augment.runner import RECORDS_FILE, run_augmentation
from miadpo.config import AugmentJobConfig, check_keys, check_recipe, config_dir, read_only, register_configs
from miadpo.pipeline import check_inputs, prepare_sources

register_configs()
CONFIG_DIR = config_dir()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="augment")
def main(cfg: DictConfig) -> None:
    """``python -m miadpo.augment``: augment ``data.source`` into ``<data.out_dir>/records.jsonl`` and print the
    summary table."""
    check_keys(cfg, AugmentJobConfig)
    cfg = read_only(cfg)
    check_recipe(cfg.data)  # type: ignore[arg-type]
    check_inputs(cfg.data)
    prepare_sources(cfg.data)
    summary = run_augmentation(cfg.data, cfg.seed)
    print(summary.table())
    print(f"records: {(summary.out_dir / RECORDS_FILE).resolve()} (resumed past {summary.resumed} done)")


if __name__ == "__main__":
    main()
