"""Supervised fine-tuning through the model adapters: ``python -m miadpo.sft data.files=[...] ...``.

Each LLaVA-format record (single- or multi-image, or augmented records with "@out/" paths) contributes its
first question and answer; the loss is the mean cross-entropy over answer tokens. Freeze switches and LoRA come
from the model config. The result is written as a standard transformers directory (LoRA merged) under
``<run_dir>/model``, ready to be the base and reference of DPO (``model.path=<run_dir>/model``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from peft import PeftModel
from torch.utils.data import DataLoader, Dataset

from miadpo.config import OptimConfig, SFTDataConfig, SFTJobConfig, check_keys, config_dir, read_only, register_configs
from miadpo.data.dataset import split_train_val
from miadpo.data.images import ImageOptions, check_record_image
from miadpo.data.jsonl import iter_raw_records
from miadpo.data.pairs import BadRecord, BadRecordReport, ImageRoots, PairRecord, load_record_images
from miadpo.dpo.optim import adamw_with_linear_schedule
from miadpo.export import export_model
from miadpo.lightning_setup import build_strategy, check_trainer_args
from miadpo.models import build_adapter
from miadpo.models.base import ModelAdapter
from miadpo.text import IMAGE_TOKEN, image_marker_in

log = logging.getLogger(__name__)
register_configs()
CONFIG_DIR = config_dir()


def read_sft_records(files: Sequence[str], roots: ImageRoots, report: BadRecordReport,
                     image_options: ImageOptions | None = None, check_images: bool = True) -> list[PairRecord]:
    """First turn of every record of every file, as (images, prompt, answer); bad records to ``report``.

    Each image is checked here, as the pair reader does: decoded (``check_images``; else only opened) by the loader
    of ``miadpo.data.images``, so a missing, corrupt, truncated or (under ``on_large_image=skip``) too large image is a
    bad record (file:line (id): reason) before training, not a crash mid-epoch."""
    records: list[PairRecord] = []
    for file in files:
        for raw in iter_raw_records(Path(file)):
            report.total += 1
            obj = raw.value
            try:
                if raw.error is not None:
                    raise ValueError(raw.error)
                if not isinstance(obj, dict) or "conversations" not in obj:
                    raise ValueError("not a LLaVA record (no conversations)")
                image = obj.get("image")
                images = [] if image is None else ([image] if isinstance(image, str) else list(image))
                turns = obj["conversations"]
                prompt, answer = turns[0]["value"], turns[1]["value"]
                if prompt.count(IMAGE_TOKEN) != len(images):
                    raise ValueError(f"{prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} for {len(images)} images")
                marker = image_marker_in(answer) if isinstance(answer, str) else None
                if marker:
                    raise ValueError(f"image marker in an answer: the gpt turn holds {marker!r}")
                for rel in images:
                    check_record_image(roots, rel, image_options, decode=check_images)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                record_id = str(obj.get("id")) if isinstance(obj, dict) else None
                report.add(BadRecord(file, raw.line, record_id, str(exc)))
                continue
            records.append(PairRecord(str(obj.get("id", f"{file}:{raw.line}")), images, prompt, answer, ""))
    report.finish()
    return records


class SFTDataset(Dataset):
    """SFT records as the adapter encodes them: images loaded, labels on the answer only, the answer cut to
    ``max_length``."""

    def __init__(self, records: Sequence[PairRecord], roots: ImageRoots, adapter: ModelAdapter, max_length: int,
                 image_options: ImageOptions | None = None):
        self.records, self.roots, self.adapter, self.max_length = list(records), roots, adapter, max_length
        self.image_options = image_options or ImageOptions()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        record = self.records[index]
        images = load_record_images(self.roots, record.images, self.image_options, f"SFT record {record.id}")
        return self.adapter.encode(images, record.prompt, record.chosen, self.max_length)


class SFTModule(L.LightningModule):
    """Mean answer-token cross-entropy (the model's own loss with answer-only labels)."""

    def __init__(self, adapter: ModelAdapter, optim: OptimConfig) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.optim = optim

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The model's own loss on the batch (answer-token cross-entropy), logged as ``train/loss``."""
        loss = self.model(**batch, use_cache=False).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Logs the model's loss on the batch as ``val/loss``."""
        loss = self.model(**batch, use_cache=False).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters with a linear warm-up and decay."""
        return adamw_with_linear_schedule(self.model, self.optim, int(self.trainer.estimated_stepping_batches))


def sft_loaders(adapter: ModelAdapter, data: SFTDataConfig, seed: int) -> tuple[DataLoader, DataLoader | None]:
    """The train loader of ``data.files`` and the validation one (None when ``data.val_fraction`` leaves no
    records); bad records are reported as ``data.on_bad_record`` says."""
    roots = ImageRoots.of(data)
    report = BadRecordReport(data.on_bad_record, data.max_bad_fraction, stage="sft")
    image_options = ImageOptions.of(data)
    records = read_sft_records(list(data.files), roots, report, image_options, data.check_images)
    train, val = split_train_val(records, data.val_fraction, seed)

    max_length = adapter.token_budget(data.max_length)

    def loader(items: list[PairRecord], shuffle: bool) -> DataLoader:
        return DataLoader(SFTDataset(items, roots, adapter, max_length, image_options), batch_size=data.batch_size,
                          shuffle=shuffle, num_workers=data.num_workers, collate_fn=adapter.collate,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None)

    return loader(train, True), (loader(val, False) if val else None)


def run_sft(cfg: DictConfig, adapter: ModelAdapter | None = None, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Fine-tune and export; returns the exported model directory."""
    check_keys(cfg, SFTJobConfig)
    cfg = read_only(cfg)
    L.seed_everything(cfg.seed, workers=True)
    adapter = adapter or build_adapter(cfg.model)
    adapter.prepare_for_training()
    train_loader, val_loader = sft_loaders(adapter, cfg.data, cfg.seed)
    kwargs = check_trainer_args(cfg.trainer)
    kwargs.setdefault("default_root_dir", cfg.run_dir)
    trainer = L.Trainer(**kwargs, strategy=build_strategy(cfg.strategy), callbacks=list(callbacks), logger=False,
                        enable_checkpointing=False)
    trainer.fit(SFTModule(adapter, cfg.optim), train_loader, val_loader)
    out = Path(cfg.run_dir) / "model"
    if trainer.is_global_zero:
        if isinstance(adapter.model, PeftModel):
            adapter.model = adapter.model.merge_and_unload()  # callers go on with the exported (merged) model
        export_model(adapter.model, out, adapter.processor_for_saving())
        print(f"model: {out.resolve()}")
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sft")
def main(cfg: DictConfig) -> None:
    """Entry point of ``python -m miadpo.sft``: ``run_sft`` of the composed config."""
    run_sft(cfg)


if __name__ == "__main__":
    main()
