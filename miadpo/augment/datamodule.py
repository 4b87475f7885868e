"""The augmentation stage as a Lightning DataModule: the records a dataset recipe's augmentation writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from miadpo.augment.runner import RECORDS_FILE, run_augmentation
from miadpo.config import DataConfig
from miadpo.data.jsonl import read_jsonl


class AugmentedRecordsDataModule(L.LightningDataModule):
    """Augmented multi-image records of a dataset recipe (``data.source`` + format mix).

    ``prepare_data`` runs the augmentation stage when its output is missing or partial (it resumes), so the
    selection stage can chain after it; ``predict_dataloader`` yields lists of record dicts.
    """

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.records: list[dict[str, Any]] = []

    def prepare_data(self) -> None:
        """Augments ``data.source`` (resuming a partial run; a finished output is only read)."""
        run_augmentation(self.cfg, self.seed, progress=False)

    def setup(self, stage: str | None = None) -> None:
        """Reads the augmented records."""
        self.records = list(read_jsonl(Path(self.cfg.out_dir) / RECORDS_FILE))

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``data.batch_size`` augmented records (lists of dicts), in file order."""
        return DataLoader(self.records, batch_size=self.cfg.batch_size, shuffle=False, collate_fn=list)
