"""The before/after evaluation of a training run: the base when training starts, the policy when it ends.

Both evaluations answer the same items, so each group's change is reported with its paired bootstrap 95%
interval and McNemar p-value (``miadpo.eval.compare``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport
from miadpo.eval.compare import PairedDifference, compare_correctness
from miadpo.eval.items import EvalItem
from miadpo.eval.scoring import ErrorClassifier, Evaluation, evaluate, published_counts
from miadpo.models.base import ModelAdapter
from miadpo.text import markdown_table

NOTHING = "in no image %"  # the toy world's share of answers naming something in no image


class BeforeAfterEval(L.Callback):
    """Evaluates the model when training starts (the base) and when it ends (the policy), on rank 0.

    Writes ``eval_before_after.json`` (``before`` and ``after`` tables, ``paired``: per group Δ, 95% interval,
    McNemar p; ``skipped``) and ``.md`` into the run directory and logs ``eval/<group>/before|after``.
    """

    def __init__(self, adapter: ModelAdapter, items: Sequence[EvalItem], run_dir: Path, batch_size: int,
                 max_new_tokens: int, classify: ErrorClassifier | None = None,
                 image_options: ImageOptions | None = None, report: BadRecordReport | None = None,
                 max_length: int | None = None) -> None:
        self.adapter = adapter
        self.items = items
        self.run_dir = run_dir
        self.settings: dict[str, Any] = {"batch_size": batch_size, "max_new_tokens": max_new_tokens,
                                         "classify": classify, "image_options": image_options, "report": report,
                                         "max_length": max_length}
        self.evaluations: dict[str, Evaluation] = {}
        self.paired: dict[str, PairedDifference] = {}

    @property
    def tables(self) -> dict[str, dict[str, dict[str, float]]]:
        """The table of each evaluation done so far, by name (``before``, ``after``)."""
        return {name: evaluation.table for name, evaluation in self.evaluations.items()}

    def _evaluate(self, name: str, trainer: L.Trainer) -> None:
        was_training = self.adapter.model.training
        evaluation = evaluate(self.adapter, self.items, **self.settings)
        self.adapter.model.train(was_training)
        self.evaluations[name] = evaluation
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"eval/{group}/{name}": row["accuracy"]
                                        for group, row in evaluation.table.items()}, step=trainer.global_step)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate the base (``before``) on rank 0."""
        if trainer.is_global_zero:
            self._evaluate("before", trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate the policy (``after``) on rank 0, compare it with ``before``, write the report files and, under an
        enabled W&B logger, log the table."""
        if not trainer.is_global_zero:
            return
        self._evaluate("after", trainer)
        self.paired = compare_correctness(self.evaluations["before"].correct(), self.evaluations["after"].correct(),
                                          published=published_counts(self.items))
        record = {**self.tables, "paired": {g: d.as_dict() for g, d in self.paired.items()},
                  "skipped": sorted(set(self.evaluations["before"].skipped) | set(self.evaluations["after"].skipped))}
        (self.run_dir / "eval_before_after.json").write_text(json.dumps(record, indent=1))
        (self.run_dir / "eval_before_after.md").write_text(self.markdown())
        if isinstance(trainer.logger, WandbLogger) and getattr(trainer.logger.experiment.settings, "mode",
                                                               "offline") != "disabled":
            self._log_table(trainer.logger.experiment)

    def _rows(self) -> list[tuple[str, dict[str, float], dict[str, float], PairedDifference | None]]:
        before, after = self.tables["before"], self.tables["after"]
        return [(group, row, after[group], self.paired.get(group)) for group, row in before.items() if group in after]

    def _log_table(self, experiment: Any) -> None:
        """The before/after table as a W&B table (one row per evaluation group)."""
        import wandb

        table = wandb.Table(columns=["group", "n", "before", "after", "delta", "ci low", "ci high", "mcnemar p",
                                     f"{NOTHING} before", f"{NOTHING} after"])
        for group, row, new, paired in self._rows():
            table.add_data(group, int(row["n"]), row["accuracy"], new["accuracy"], new["accuracy"] - row["accuracy"],
                           paired.low if paired else None, paired.high if paired else None,
                           paired.mcnemar_p if paired else None, row.get(NOTHING), new.get(NOTHING))
        experiment.log({"eval/before_after": table})

    def markdown(self) -> str:
        """The before/after table as markdown: per group n, both accuracies, Δ, its 95% interval, the McNemar p-value
        and, for toy questions, the share of answers in no image before → after."""
        rows = []
        for group, row, new, paired in self._rows():
            nothing = f"{row[NOTHING]:.1f} → {new[NOTHING]:.1f}" if NOTHING in row else ""
            p_value = "" if paired is None or paired.mcnemar_p is None else f"{paired.mcnemar_p:.3g}"
            rows.append([group, int(row["n"]), f"{row['accuracy']:.1f}", f"{new['accuracy']:.1f}",
                         f"{new['accuracy'] - row['accuracy']:+.1f}", paired.interval() if paired else "",
                         p_value, nothing])
        header = ["group", "n", "before", "after", "Δ", "95% CI", "McNemar p", "in no image % before → after"]
        return markdown_table(header, rows) + "\n"
