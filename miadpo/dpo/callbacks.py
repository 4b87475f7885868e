"""Lightning callbacks of the training entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from peft import PeftModel

from miadpo.dpo.health import TrainingHealth
from miadpo.export import NonFiniteWeightsError, export_model
from miadpo.models.base import ModelAdapter


class LogLastStep(L.Callback):
    """Logs the last training step's metrics when Lightning did not (it logs every ``trainer.log_every_n_steps``
    optimizer steps, so a run shorter than that logged no step at all, and a longer one lost its tail).

    After every optimizer step that Lightning will not log, the step's metrics (the tensors, converted only at
    the end) are kept; at the end of training they are logged at that step, as Lightning would have.
    """

    def __init__(self) -> None:
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._seen_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Keeps this optimizer step's metrics when Lightning will not log them (none kept when it will)."""
        step = trainer.global_step  # optimizer steps so far, this batch's included
        if step == self._seen_step:
            return  # a batch accumulating gradients: Lightning logs the step's last batch
        self._seen_step = step
        every = trainer.log_every_n_steps
        # Lightning's own rule (LoggerConnector.should_update_logs, checked right after this hook).
        logged = every == 0 or step % every == 0 or trainer.should_stop or bool(trainer.fast_dev_run)
        if logged:
            self._pending = None
            return
        metrics = dict(trainer._logger_connector.metrics["log"])  # what Lightning would log at this step
        self._pending = (step - 1, {**metrics, "epoch": trainer.current_epoch})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Logs the last step's kept metrics, if any, at that step to every logger."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        scalars = {k: float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            logger.save()


class ExportModel(L.Callback):
    """After fit (rank 0): a LoRA run writes ``<run_dir>/adapter`` (plain peft ``save_pretrained``, with the
    base weights' location recorded); a full fine-tune writes ``<run_dir>/model`` (a transformers directory).
    The processor is saved beside either. Non-finite weights are refused (nothing is written)."""

    def __init__(self, adapter: ModelAdapter, run_dir: Path, base_model_path: str) -> None:
        self.adapter = adapter
        self.run_dir = run_dir
        self.base_model_path = base_model_path
        self.exported: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Exports the trained model on rank 0 (the full state gathered under a sharded strategy); non-finite
        weights raise ``NonFiniteWeightsError`` naming the step."""
        state_dict = None
        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy | DeepSpeedStrategy):
            # Sharded parameters: gather the full state on rank 0 (a collective: every rank takes part).
            full = trainer.strategy.lightning_module_state_dict()
            state_dict = {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
        if not trainer.is_global_zero:
            return
        model = self.adapter.model
        target = self.run_dir / ("adapter" if isinstance(model, PeftModel) else "model")
        try:
            self.exported = export_model(model, target, self.adapter.processor_for_saving(),
                                         base_model_path=self.base_model_path, state_dict=state_dict)
        except NonFiniteWeightsError as error:
            health = next((c for c in trainer.callbacks if isinstance(c, TrainingHealth)), None)
            raise NonFiniteWeightsError(health.nonfinite_message(str(error), trainer.global_step) if health is not None
                                        else f"after step {trainer.global_step}: {error}") from None
