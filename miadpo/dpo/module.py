"""Reference-model DPO as a LightningModule.

The forward pass lives in one object, ``pair_forward`` (batch of pairs → answer log-probs); the loss, the
data code and the logging never look inside it, so a faster forward can be swapped in.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from peft import PeftModel
from torch import nn

from miadpo.config import DPOConfig, FastPathConfig, OptimConfig
from miadpo.dpo.batch import ConcatenatedBatch, PairBatch, PairLogps
from miadpo.dpo.forward import ConcatenatedPairForward, PairForward, SharedPrefixPairForward
from miadpo.dpo.losses import AnchorLoss, ConditionalPreferenceLoss, build_loss, rewards
from miadpo.dpo.optim import adamw_with_linear_schedule
from miadpo.dpo.reference_cache import InStepFilling, ReferenceCache
from miadpo.export import nonfinite_names
from miadpo.models.base import ModelAdapter

log = logging.getLogger(__name__)


def build_pair_forward(adapter: ModelAdapter, fast: FastPathConfig) -> PairForward:
    """The shared-prefix forward where it applies (no gradient checkpointing, a family whose cache it can share),
    else the plain one."""
    if fast.shared_prefix and not adapter.shared_prefix_exact:
        if adapter.cfg.family not in _SAID_NO_SHARED_PREFIX:
            _SAID_NO_SHARED_PREFIX.add(adapter.cfg.family)
            log.warning("dpo.fast.shared_prefix: %s's linear-attention layers keep a recurrent state that the cache "
                        "cannot repeat per answer; this family uses the plain forward (the same log-probs, the "
                        "prompt run once per answer)", adapter.cfg.family)
        return ConcatenatedPairForward(adapter)
    if fast.shared_prefix and not adapter.cfg.gradient_checkpointing:
        return SharedPrefixPairForward(adapter)
    return ConcatenatedPairForward(adapter)


_SAID_NO_SHARED_PREFIX: set[str] = set()  # families whose fallback was logged (once per process)


def vision_path_is_frozen(adapter: ModelAdapter) -> bool:
    """Whether no parameter of the vision tower and projector trains (no LoRA there either): their features are
    then the same for the policy and the reference."""
    groups = adapter.module_groups()
    return not any(p.requires_grad for group in ("vision_tower", "projector") for p in groups[group].parameters())


class DPOModule(L.LightningModule):
    """Policy = ``adapter.model``; reference = the same network with LoRA disabled, or a frozen copy.

    ``reference_cache``: reference log-probs are read from it where it holds the pair; with ``cached_reference``
    (filled by a pre-pass) it holds every pair and no reference is built, else the reference is computed in the
    step for the pairs it lacks and written to it (``InStepFilling``)."""

    def __init__(self, adapter: ModelAdapter, dpo: DPOConfig, optim: OptimConfig,
                 pair_forward: PairForward | None = None, cached_reference: bool = False,
                 reference_cache: ReferenceCache | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.policy = adapter.model
        self.dpo = dpo
        self.optim = optim
        self.loss_fn = build_loss(dpo)
        self.conditional = ConditionalPreferenceLoss(dpo.beta) if dpo.conditional_weight else None
        self.anchor = AnchorLoss(dpo.beta, dpo.anchor_delta) if dpo.anchor_weight else None
        self.pair_forward = pair_forward or build_pair_forward(adapter, dpo.fast)
        self.plain_forward = ConcatenatedPairForward(adapter)
        self.share_image_features = dpo.fast.shared_image_features and vision_path_is_frozen(adapter)
        self.cached_reference = cached_reference
        self.reference_cache = reference_cache
        self.filling = InStepFilling(reference_cache) if reference_cache is not None and not cached_reference \
            else None
        if isinstance(self.policy, PeftModel) or cached_reference:
            self.reference: nn.Module | None = None  # LoRA disabled, or log-probs from the cache: no copy
        else:
            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        # Checkpoints hold trainable weights only; the frozen rest is rebuilt from the model config.
        self.strict_loading = False
        # Training health, checked once per optimizer step (on_before_optimizer_step): per micro-batch since the
        # last step, (loss, policy and reference mean log-prob per chosen-answer token).
        self._health: list[torch.Tensor] = []
        self._last_finite_loss: tuple[int, float] | None = None
        self._collapse_warned = False

    @contextmanager
    def _reference_model(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
            return
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                yield self.policy
        finally:
            self.policy.train(was_training)

    def _forward_for(self, batch: PairBatch) -> PairForward:
        """The configured pair forward, or the plain one for a batch another forward collated (a ConcatenatedBatch)."""
        if isinstance(batch, self.pair_forward.batch_type):
            return self.pair_forward
        if isinstance(batch, ConcatenatedBatch):
            return self.plain_forward
        raise TypeError(f"{type(self.pair_forward).__name__} cannot read a {type(batch).__name__}")

    def policy_logps(self, batch: PairBatch, image_features: Any | None = None) -> PairLogps:
        return self._forward_for(batch)(self.policy, batch, image_features)

    @torch.no_grad()
    def shared_image_features(self, batch: PairBatch) -> Any | None:
        """The batch's image features, computed once for the reference and the policy forward when the vision
        path is frozen (``dpo.fast.shared_image_features``); ``None`` lets each forward compute its own."""
        if not self.share_image_features:
            return None
        return self._forward_for(batch).image_features(self.policy, batch)

    @torch.no_grad()
    def reference_logps(self, batch: PairBatch, image_features: Any | None = None) -> PairLogps:
        cached = batch.cached_reference()  # served with the pairs (miadpo.dpo.reference_cache)
        if cached is None and batch.keys is not None and self.reference_cache is not None:
            # cached after the loader read the pairs
            cached = self.reference_cache.lookup(batch.keys, self.device, batch.has_negative)
        if cached is not None:
            return cached
        if self.cached_reference:
            raise RuntimeError("dpo.fast.reference_cache is on but a batch came without cached reference log-probs")
        with self._reference_model() as reference:
            logps = self._forward_for(batch)(reference, batch, image_features)
        if self.filling is not None and batch.keys is not None:
            self.filling.record(batch.keys, logps)
        return logps

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.filling] if self.filling is not None else []

    def _step(self, batch: PairBatch, prefix: str) -> torch.Tensor:
        features = self.shared_image_features(batch)
        reference = self.reference_logps(batch, features)
        policy = self.policy_logps(batch, features)
        losses = self.loss_fn(policy, reference)
        loss = losses.mean()
        if self.conditional is not None or self.anchor is not None:
            loss = loss + self._image_terms(policy, reference, losses, prefix, batch.num_pairs)
        if self.dpo.sft_weight:
            sft = -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)
            loss = loss + self.dpo.sft_weight * sft
            self.log(f"{prefix}sft_loss", sft.detach(), batch_size=batch.num_pairs)
        chosen_rewards, rejected_rewards = rewards(policy, reference, self.dpo.beta)
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
        }
        training = prefix == ""
        self.log_dict({prefix + k: v for k, v in metrics.items()}, batch_size=batch.num_pairs,
                      prog_bar=False, on_step=training, on_epoch=not training, sync_dist=not training)
        if training and self._trainer is not None:
            self._health.append(torch.stack([
                loss.detach().float(),
                policy.chosen.detach().float().sum() / policy.chosen_tokens.sum().clamp(min=1),
                reference.chosen.detach().float().sum() / reference.chosen_tokens.sum().clamp(min=1)]))
        return loss

    def _image_terms(self, policy: PairLogps, reference: PairLogps, text: torch.Tensor, prefix: str,
                     num_pairs: int) -> torch.Tensor:
        """The weighted conditional and anchor terms (``miadpo.dpo.losses``), each logged apart from the text term,
        with the chosen answer's rewards for the original and the negative images."""
        training = prefix == ""
        metrics = {"loss/text": text.detach().mean()}
        total = torch.zeros((), device=text.device, dtype=text.dtype)
        has = policy.has_negative
        if self.conditional is not None and has is not None and bool(has.any()):
            assert policy.negative is not None and reference.negative is not None
            conditional = self.conditional(policy, reference)[has].mean()
            total = total + self.dpo.conditional_weight * conditional
            original = self.dpo.beta * (policy.chosen - reference.chosen).detach()[has]
            negative = self.dpo.beta * (policy.negative - reference.negative).detach()[has]
            metrics |= {"loss/conditional": conditional.detach(), "rewards/chosen_original_images": original.mean(),
                        "rewards/chosen_negative_images": negative.mean(),
                        "rewards/image_margins": (original - negative).mean(),
                        "rewards/image_accuracies": (original > negative).float().mean()}
        if self.anchor is not None:
            anchor = self.anchor(policy, reference).mean()
            total = total + self.dpo.anchor_weight * anchor
            metrics["loss/anchor"] = anchor.detach()
        self.log_dict({prefix + k: v for k, v in metrics.items()}, batch_size=num_pairs, on_step=training,
                      on_epoch=not training, sync_dist=not training)
        return total

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "")

    def validation_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val/")

    # ----- training health: no non-finite step goes unnoticed, a collapsing policy is warned about -----------------
    def _clipping(self) -> float | None:
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):  # DeepSpeed clips by its own configuration
            return strategy.config.get("gradient_clipping")
        return self.trainer.gradient_clip_val

    def nonfinite_message(self, what: str, step: int) -> str:
        """Why training stopped: ``what`` went non-finite at ``step``, the last finite loss, and the settings most
        likely responsible."""
        lr, beta, clip, precision = self.optim.lr, self.dpo.beta, self._clipping(), str(self.trainer.precision)
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

    def _nonfinite_gradients(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Whether a gradient holds a NaN or an infinity (None: not checked). Under float16 loss scaling an
        infinite gradient is routine: the scaler skips that step and lowers the scale."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return None
        flags = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is not None:
                    grad = grad.to_local() if hasattr(grad, "to_local") else grad
                    flags.append(~torch.isfinite(grad).all())
        return torch.stack([f.to(flags[0].device) for f in flags]).any() if flags else None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stops at the first non-finite loss or gradient (every process decides alike, so none waits for another);
        warns once when the policy's chosen answers fall far below the reference's (a collapsing model)."""
        if not self._health:
            return
        health = torch.stack(self._health)
        self._health = []
        bad_loss = ~torch.isfinite(health[:, 0]).all()
        bad_grads = self._nonfinite_gradients(optimizer)
        bad_grads = bad_grads.to(bad_loss.device) if bad_grads is not None else torch.zeros_like(bad_loss)
        # One device-to-host copy per optimizer step.
        loss_bad, grads_bad, loss, policy_chosen, reference_chosen = torch.cat(
            [torch.stack([bad_loss, bad_grads]).float(), health.mean(0)]).tolist()
        step = self.trainer.global_step
        if self.trainer.strategy.reduce_boolean_decision(bool(loss_bad or grads_bad), all=False):
            what = ("the loss is not finite" if loss_bad else "a gradient is not finite (the loss still was)"
                    if grads_bad else "another process's loss or gradient is not finite")
            raise FloatingPointError(self.nonfinite_message(what, step))
        self._last_finite_loss = (step, loss)
        nats = self.dpo.collapse_warning_nats
        if nats is not None and not self._collapse_warned and reference_chosen - policy_chosen > nats:
            self._collapse_warned = True
            if self.trainer.is_global_zero:
                log.warning(
                    "step %d: the policy's mean log-prob per chosen-answer token (%.3f) is %.2f nats below the "
                    "reference's (%.3f), more than dpo.collapse_warning_nats=%g: the model is collapsing (e.g. to "
                    "uniform output); check optim.lr=%g (and dpo.beta=%g). Warned once per run.", step,
                    policy_chosen, reference_chosen - policy_chosen, reference_chosen, nats, self.optim.lr,
                    self.dpo.beta)

    def configure_model(self) -> None:
        """Under ``strategy=fsdp`` (Lightning's ModelParallelStrategy): shard every decoder layer, then the rest."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        # The vision path's parameters sit in the root unit, gathered only inside the model's own forward: each
        # forward computes its image features (the model's get_image_features called alone would see shards).
        self.share_image_features = False
        data_parallel = mesh["data_parallel"]
        for layer in self.adapter.decoder_layers():
            fully_shard(layer, mesh=data_parallel)
        fully_shard(self.policy, mesh=data_parallel)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_linear_schedule(self.policy, self.optim, int(self.trainer.estimated_stepping_batches))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        bad = nonfinite_names(checkpoint["state_dict"].items())
        if bad:  # raised before anything is written: no checkpoint with NaN weights
            step = checkpoint.get("global_step", self.trainer.global_step)
            raise FloatingPointError(self.nonfinite_message(
                f"the trainable weights are not finite ({len(bad)} tensors, e.g. {bad[0]}), so the checkpoint is "
                "refused", step))

