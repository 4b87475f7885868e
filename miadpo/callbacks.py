"""Lightning callbacks of the training entry point."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from peft import PeftModel

from miadpo.models.base import ModelAdapter


class ExportModel(L.Callback):
    """After fit (rank 0): a LoRA run writes ``<run_dir>/adapter`` (plain peft ``save_pretrained``, with the
    base weights' location recorded); a full fine-tune writes ``<run_dir>/model`` (a transformers directory).
    The processor is saved beside either."""

    def __init__(self, adapter: ModelAdapter, run_dir: Path, base_model_path: str) -> None:
        self.adapter = adapter
        self.run_dir = run_dir
        self.base_model_path = base_model_path
        self.exported: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = self.adapter.model
        if isinstance(model, PeftModel):
            target = self.run_dir / "adapter"
            for peft_config in model.peft_config.values():
                peft_config.base_model_name_or_path = self.base_model_path
        else:
            target = self.run_dir / "model"
        model.save_pretrained(target)
        self.adapter.processor_for_saving().save_pretrained(target)
        self.exported = target
