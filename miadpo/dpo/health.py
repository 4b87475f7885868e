"""Training health as a Lightning callback: no non-finite step goes unnoticed, a collapsing policy is warned about.

The DPO step hands each micro-batch's loss and mean chosen-answer log-probs to ``TrainingHealth.record``; once
per optimizer step (``on_before_optimizer_step``) they are checked with the gradients, in one device-to-host copy.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from miadpo.dpo.batch import PairLogps

log = logging.getLogger(__name__)


class TrainingHealth(L.Callback):
    """Stops at the first non-finite loss or gradient, naming the settings most likely responsible; warns once when
    the policy's chosen answers fall ``collapse_warning_nats`` below the reference's per token (a collapsing model).

    ``lr`` and ``beta`` are the run's, for the message."""

    def __init__(self, lr: float, beta: float, collapse_warning_nats: float | None) -> None:
        self.lr = lr
        self.beta = beta
        self.collapse_warning_nats = collapse_warning_nats
        self._rows: list[torch.Tensor] = []  # per micro-batch since the last step: loss, policy, reference
        self._last_finite_loss: tuple[int, float] | None = None
        self._collapse_warned = False
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Keeps the trainer, whose settings ``nonfinite_message`` names."""
        self._trainer = trainer

    def record(self, loss: torch.Tensor, policy: PairLogps, reference: PairLogps) -> None:
        """One training micro-batch's loss and mean chosen-answer log-probs under the policy and the reference."""
        self._rows.append(torch.stack([loss.detach().float(), policy.detach().chosen_per_token().float(),
                                       reference.detach().chosen_per_token().float()]))

    def _clipping(self, trainer: L.Trainer) -> float | None:
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):  # DeepSpeed clips by its own configuration
            return strategy.config.get("gradient_clipping")
        return trainer.gradient_clip_val

    def nonfinite_message(self, what: str, step: int) -> str:
        """Why training stopped: ``what`` went non-finite at ``step``, the last finite loss, and the settings most
        likely responsible."""
        assert self._trainer is not None, "TrainingHealth is not attached to a Trainer"
        lr, beta = self.lr, self.beta
        clip, precision = self._clipping(self._trainer), str(self._trainer.precision)
        last = (f"last finite loss {self._last_finite_loss[1]:.6g} at step {self._last_finite_loss[0]}"
                if self._last_finite_loss is not None else "last finite loss: none (no step before it)")
        suspects = []
        if lr > 1e-2:
            suspects.append(f"optim.lr={lr:g} (DPO learning rates are about 1e-6 to 1e-3)")
        if beta > 10:
            suspects.append(f"dpo.beta={beta:g} (β times the log-prob margin overflows; usual β: 0.01 to 1)")
        if not clip:
            suspects.append(f"gradient clipping off (trainer.gradient_clip_val={clip}; the default clips at 1.0)")
        if precision.startswith("16"):
            suspects.append(f"trainer.precision={precision} (float16 overflows above 65504: try bf16-mixed or "
                            "32-true)")
        settings = (f"optim.lr={lr:g}, dpo.beta={beta:g}, trainer.gradient_clip_val={clip}, "
                    f"trainer.precision={precision}")
        return (f"training stopped at step {step}: {what}; {last}. No checkpoint or export holds non-finite weights. "
                f"Most likely responsible: {'; '.join(suspects) or 'no single setting stands out'} ({settings})")

    @staticmethod
    def _nonfinite_gradients(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Whether a gradient holds a NaN or an infinity (None: not checked). Under float16 loss scaling an
        infinite gradient is routine: the scaler skips that step and lowers the scale."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return None
        flags = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is not None:
                    grad = grad.to_local() if hasattr(grad, "to_local") else grad
                    flags.append(~torch.isfinite(grad).all())
        return torch.stack([f.to(flags[0].device) for f in flags]).any() if flags else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Raises FloatingPointError at a non-finite loss or gradient (every process decides alike, so none waits
        for another); warns once about a collapsing policy."""
        if not self._rows:
            return
        rows = torch.stack(self._rows)
        self._rows = []
        bad_loss = ~torch.isfinite(rows[:, 0]).all()
        bad_grads = self._nonfinite_gradients(trainer, optimizer)
        bad_grads = bad_grads.to(bad_loss.device) if bad_grads is not None else torch.zeros_like(bad_loss)
        # One device-to-host copy per optimizer step.
        loss_bad, grads_bad, loss, policy_chosen, reference_chosen = torch.cat(
            [torch.stack([bad_loss, bad_grads]).float(), rows.mean(0)]).tolist()
        step = trainer.global_step
        if trainer.strategy.reduce_boolean_decision(bool(loss_bad or grads_bad), all=False):
            what = ("the loss is not finite" if loss_bad else "a gradient is not finite (the loss still was)"
                    if grads_bad else "another process's loss or gradient is not finite")
            raise FloatingPointError(self.nonfinite_message(what, step))
        self._last_finite_loss = (step, loss)
        nats = self.collapse_warning_nats
        if nats is not None and not self._collapse_warned and reference_chosen - policy_chosen > nats:
            self._collapse_warned = True
            if trainer.is_global_zero:
                log.warning(
                    "step %d: the policy's mean log-prob per chosen-answer token (%.3f) is %.2f nats below the "
                    "reference's (%.3f), more than dpo.collapse_warning_nats=%g: the model is collapsing (e.g. to "
                    "uniform output); check optim.lr=%g (and dpo.beta=%g). Warned once per run.", step,
                    policy_chosen, reference_chosen - policy_chosen, reference_chosen, nats, self.lr, self.beta)
